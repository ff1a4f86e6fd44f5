//! What the member asks of the daemon, and the one way a history record is written.
//!
//! Owns [`Out`]. The sub-states return their outputs as `Vec<Out>` in the order they happened and
//! `Member` queues them, so only `Member` sees a frame leave (the link's send timer depends on
//! it). Must never: hold state, or send anything itself.

use crate::clock::Now;
use log::warn;

use super::error::MemberError;
use crate::proto::control::{MsgState, PeerView, Record, RecordBody, Sent};
use crate::proto::relay::ToRelay;
use crate::store::MemberStore;

/// What the daemon must do for the member.
#[derive(Debug)]
pub enum Out {
    /// Send a frame to the relay.
    Frame(ToRelay),
    /// Close the link to the relay (protocol error, refusal, or silence); reconnect later.
    Close,
    /// A new history record, for `tail -f` clients.
    Record(Record),
    /// A sent message reached a new state (with the reason for `Failed`), for `send --wait`.
    State([u8; 16], MsgState, Option<String>),
    /// A send that was sealed over several turns (see [`super::Started::Sealing`]) is queued,
    /// or failed as a whole.
    Sealed(u64, Result<Vec<Sent>, MemberError>),
    /// The relay answered a key lookup, or the link went down: requests parked on
    /// [`MemberError::KeysPending`](super::MemberError::KeysPending) can be tried again.
    Looked,
    /// A page of `who --all` for request `req`, or why the listing ended early.
    Listed {
        /// The daemon's number for the listing.
        req: u64,
        /// The page, or the reason there is none.
        page: Result<ListPage, String>,
    },
}

/// One page of the relay's directory as `who --all` shows it.
#[derive(Debug)]
pub struct ListPage {
    /// The entries, in name order.
    pub views: Vec<PeerView>,
    /// Where the next page starts (the last name of this one), if more follow.
    pub next: Option<String>,
}

/// Append a history record and announce it; a failed write is logged and nothing is announced,
/// so `tail -f` never shows a record that the history does not hold.
pub(super) fn record(
    store: &mut dyn MemberStore,
    now: Now,
    peer: &str,
    body: RecordBody,
    out: &mut Vec<Out>,
) {
    match store.append(now.wall, peer, body) {
        Ok(r) => out.push(Out::Record(r)),
        Err(e) => warn!("cannot store history record: {e}"),
    }
}
