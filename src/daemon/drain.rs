//! Draining the cores' output each turn: relay frames into peers' buffers, a member's frames
//! onto its uplink, its records to followers and its state changes to `--wait` waiters, and a
//! host's two cores through [`host::pump`].
//!
//! Must never: write to a socket (buffers are flushed after the commit) or decide a reply.

use crate::clock::Now;
use mio::Registry;

use super::control::Waiters;
use super::roles::Roles;
use super::table::Table;
use crate::host::{self, Link};
use crate::member::{self, Member};
use crate::relay::{self, Relay};
use crate::store::Store;

/// A host's cores for [`host::pump`], with the sinks for the output that is not the link's.
struct HostTurn<'a> {
    relay: &'a mut Relay,
    member: &'a mut Member,
    link: &'a mut Link,
    store: &'a mut Store,
    table: &'a mut Table,
    waiters: &'a mut Waiters,
}

impl host::Cores for HostTurn<'_> {
    fn relay(&mut self) -> (&mut Relay, &mut Store) {
        (self.relay, self.store)
    }
    fn members(&self) -> usize {
        1
    }
    fn member(&mut self, _: usize) -> (&mut Link, &mut Member, &mut Store) {
        (self.link, self.member, self.store)
    }
    fn relay_out(&mut self, out: relay::Out) {
        self.table.relay_out(out);
    }
    fn member_out(&mut self, _: usize, out: member::Out) {
        member_out(self.table, self.waiters, out);
    }
}

/// A member's records go to the followers, its state changes to the waiters.
fn member_out(table: &mut Table, waiters: &mut Waiters, out: member::Out) {
    match out {
        member::Out::Record(rec) => table.publish(&rec),
        member::Out::State(id, st, why) => {
            for (token, resp) in waiters.advance(id, st, why.as_deref()) {
                table.reply(token, &resp);
            }
        }
        member::Out::Looked => waiters.looked(),
        member::Out::Listed { req, page } => table.listed(req, page),
        member::Out::Sealed(job, result) => {
            if let Some((token, resp)) = waiters.sealed(job, result) {
                table.reply(token, &resp);
            }
        }
        member::Out::Frame(_) | member::Out::Close => {}
    }
}

/// Drain the cores' outputs into buffers (a host's two cores talk in memory) until they
/// are quiet.
pub fn pump(
    roles: &mut Roles,
    store: &mut Store,
    table: &mut Table,
    waiters: &mut Waiters,
    registry: &Registry,
    now: Now,
) {
    match roles {
        Roles::Relay(relay) => {
            while let Some(out) = relay.poll() {
                table.relay_out(out);
            }
        }
        Roles::Member { member, uplink } => loop {
            let mut progressed = false;
            let mut frames = Vec::new();
            let mut close = false;
            while let Some(out) = member.poll() {
                progressed = true;
                match out {
                    member::Out::Frame(f) => frames.push(f),
                    member::Out::Close => close = true,
                    out => member_out(table, waiters, out),
                }
            }
            uplink.send(registry, member, frames, close, now);
            if !progressed {
                break;
            }
        },
        Roles::Host {
            relay,
            member,
            link,
        } => host::pump(
            &mut HostTurn {
                relay,
                member,
                link,
                store,
                table,
                waiters,
            },
            now,
        ),
    }
}
