//! The documentation is made from, or checked against, the one definition of every flag
//! (STYLE principle 7): the clap commands `chatd::cli::Args` (chatctl) and
//! `chatd::config::Flags` (chatd).
//!
//! - The shell completions in `contrib/completions/` are generated from them with
//!   `clap_complete`; a test compares each file byte for byte. After changing a flag, rewrite
//!   them with `CHATD_UPDATE_COMPLETIONS=1 cargo test --test docs` and commit the result.
//! - Every subcommand, long and short flag and possible value must be documented as an item in
//!   its man page (`man/chatctl.1`, `man/chatd.8`), and every flag an item there names must
//!   exist.
//! - Every key of the config file (a key per chatd flag, with `_` for `-`, plus `log_level`)
//!   must be documented with its default in `man/chatd.toml.5` and appear, commented out with
//!   its default, in `contrib/chatd.toml.example`.
//! - What the pages and the example say of each setting's environment variables, default and
//!   SIGHUP treatment (applied, or needs a restart) must be what its row of
//!   `chatd::config::SETTINGS`, the one definition of chatd's settings, says.
//! - Every `--json` object `src/cli/format.rs` prints is shown in `man/chatctl.1` with the same
//!   keys in the same order.
//!
//! The man pages are mdoc; `.ci/run` lints them with `mandoc -Tlint`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

/// How to rewrite the completion scripts.
const REGENERATE: &str = "CHATD_UPDATE_COMPLETIONS=1 cargo test --test docs";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The two programs: binary name, clap command (built, so `--help`, `--version` and the `help`
/// subcommand are there as users see them) and man page.
fn programs() -> Vec<(&'static str, clap::Command, &'static str)> {
    let mut chatctl = chatd::cli::Args::command();
    chatctl.build();
    let mut chatd = chatd::config::Flags::command();
    chatd.build();
    vec![
        ("chatctl", chatctl, "man/chatctl.1"),
        ("chatd", chatd, "man/chatd.8"),
    ]
}

// ---------------------------------------------------------------------------------------------
// Completions.

fn completion_path(shell: Shell, bin: &str) -> PathBuf {
    let file = match shell {
        Shell::Bash => format!("{bin}.bash"),
        Shell::Zsh => format!("_{bin}"),
        Shell::Fish => format!("{bin}.fish"),
        other => panic!("no file name for {other} completions"),
    };
    root().join("contrib/completions").join(file)
}

fn generate(shell: Shell, bin: &str) -> Vec<u8> {
    let mut cmd = match bin {
        "chatctl" => chatd::cli::Args::command(),
        "chatd" => chatd::config::Flags::command(),
        other => panic!("unknown program {other}"),
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, bin, &mut out);
    if bin == "chatctl" {
        let script = String::from_utf8(out).expect("clap_complete writes UTF-8");
        return with_people(shell, script).into_bytes();
    }
    out
}

/// chatctl's arguments that name a user (`ValueHint::Username`) complete from the running
/// chatd's `who` (issue 11), not from the system's accounts: clap_complete's scripts get the
/// shell's own user completion for them, and this replaces it. Each shell asks
/// `chatctl [--socket PATH] who` (PATH as given on the line), at most 2 s, and completes
/// nothing when no chatd answers.
fn with_people(shell: Shell, script: String) -> String {
    match shell {
        Shell::Bash => script + BASH_PEOPLE,
        Shell::Zsh => {
            let n = script.matches(":_users'").count();
            assert_eq!(n, 5, "zsh: the five user arguments use _users");
            let script = script.replace(":_users'", ":_chatctl_users'");
            let tail = "if [ \"$funcstack[1]\" = \"_chatctl\" ]; then";
            let at = script
                .rfind(tail)
                .expect("the zsh script ends by registering _chatctl");
            format!("{}{ZSH_PEOPLE}{}", &script[..at], &script[at..])
        }
        Shell::Fish => {
            assert_eq!(script.matches("(__fish_complete_users)").count(), 1);
            script.replace("(__fish_complete_users)", "(__fish_chatctl_users)") + FISH_PEOPLE
        }
        other => panic!("no user completion for {other}"),
    }
}

const BASH_PEOPLE: &str = r#"
# User names from the running chatd (written by tests/docs.rs, issue 11): for send, chat, trust,
# fingerprint and tail --with; nothing when no chatd answers.
_chatctl_users() {
    local i sock=() t=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        if [[ ${COMP_WORDS[i]} == --socket ]]; then
            sock=(--socket "${COMP_WORDS[i+1]}")
        fi
    done
    command -v timeout >/dev/null 2>&1 && t=(timeout 2)
    "${t[@]}" chatctl "${sock[@]}" who 2>/dev/null | while IFS=' ' read -r name _; do
        printf '%s\n' "$name"
    done
}

_chatctl_people() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} i sub= dashdash= people=
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
        --socket) ((i++)) ;;
        -*) ;;
        *) sub=${COMP_WORDS[i]}; break ;;
        esac
    done
    for ((i++; i < COMP_CWORD; i++)); do
        [[ ${COMP_WORDS[i]} == -- ]] && dashdash=1
    done
    if [[ $cur != -* ]]; then
        case $sub:$prev in
        tail:--with) people=1 ;;
        send:--wait | send:--timeout | send:--socket) ;;
        send:*) [[ -z $dashdash ]] && people=1 ;;
        chat:chat | trust:trust | fingerprint:fingerprint) people=1 ;;
        esac
    fi
    if [[ -n $people ]]; then
        local IFS=$'\n'
        COMPREPLY=($(compgen -W "$(_chatctl_users)" -- "$cur"))
        return 0
    fi
    _chatctl "$@"
}

complete -F _chatctl_people -o bashdefault -o default chatctl
"#;

const ZSH_PEOPLE: &str = r#"# User names from the running chatd (written by tests/docs.rs, issue 11); nothing when no
# chatd answers.
(( $+functions[_chatctl_user_names] )) ||
_chatctl_user_names() {
    local -a sock t
    local i=${words[(i)--socket]}
    (( i < $#words )) && sock=(--socket "${words[i+1]}")
    (( $+commands[timeout] )) && t=(timeout 2)
    local line
    $t chatctl $sock who 2>/dev/null | while read -r line; do
        print -r -- "${line%% *}"
    done
}
(( $+functions[_chatctl_users] )) ||
_chatctl_users() {
    local -a names
    names=(${(f)"$(_chatctl_user_names)"})
    compadd -a names
}

"#;

const FISH_PEOPLE: &str = r#"
# User names from the running chatd (written by tests/docs.rs, issue 11); nothing when no
# chatd answers.
function __fish_chatctl_users
    set -l cmd (commandline -opc)
    set -l sock
    set -l i (contains -i -- --socket $cmd)
    and set sock --socket $cmd[(math $i + 1)]
    set -l t
    command -q timeout
    and set t timeout 2
    $t chatctl $sock who 2>/dev/null | string replace -r ' .*' ''
end
# A user is wanted: any word of send before `--`; the first word after chat, trust, fingerprint.
function __fish_chatctl_wants_user
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_chatctl_global_optspecs) -- $cmd 2>/dev/null
    or return 1
    set -q argv[1]
    or return 1
    set -l sub $argv[1]
    set -e argv[1]
    switch $sub
        case send
            not contains -- -- $argv
        case chat trust fingerprint
            test (count (string match -v -r -- '^-' $argv)) -eq 0
        case '*'
            return 1
    end
end
complete -c chatctl -n "__fish_chatctl_wants_user" -f -a "(__fish_chatctl_users)"
"#;

#[test]
fn completions_match_the_flag_definitions() {
    let update = std::env::var_os("CHATD_UPDATE_COMPLETIONS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for bin in ["chatctl", "chatd"] {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let want = generate(shell, bin);
            let path = completion_path(shell, bin);
            if update {
                fs::create_dir_all(path.parent().expect("a parent directory"))
                    .expect("create contrib/completions");
                fs::write(&path, &want)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
                continue;
            }
            match fs::read(&path) {
                Ok(have) if have == want => {}
                Ok(_) => stale.push(format!("{} is stale", path.display())),
                Err(e) => stale.push(format!("{} cannot be read: {e}", path.display())),
            }
        }
    }
    assert!(
        stale.is_empty(),
        "the shell completions do not match the clap flag definitions:\n  {}\n\
         regenerate them with `{REGENERATE}` and commit contrib/completions/",
        stale.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// Man pages.

/// The macro lines of an mdoc page, each split into its words (the leading `.` dropped).
fn macro_lines(page: &str) -> Vec<Vec<String>> {
    page.lines()
        .filter_map(|l| l.strip_prefix('.'))
        .filter(|l| !l.starts_with('\\'))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

/// The words of the item heads (`.It ...`, or for `.It Xo` the lines up to `.Xc`) of a page.
fn item_heads(page: &str) -> Vec<Vec<String>> {
    let mut heads = Vec::new();
    let mut open: Option<Vec<String>> = None;
    for words in macro_lines(page) {
        if let Some(head) = open.as_mut() {
            if words.first().map(String::as_str) == Some("Xc") {
                heads.push(open.take().expect("an open head"));
            } else {
                head.extend(words);
            }
            continue;
        }
        if words.first().map(String::as_str) == Some("It") {
            if words.get(1).map(String::as_str) == Some("Xo") {
                open = Some(Vec::new());
            } else {
                heads.push(words[1..].to_vec());
            }
        }
    }
    heads
}

/// The words after each `Fl` in `lines`, as written (e.g. `-socket` for `--socket`, `n` for
/// `-n`); `\-` is read as `-`.
fn flags_in(lines: &[Vec<String>]) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    for words in lines {
        for pair in words.windows(2) {
            if pair[0] == "Fl" {
                flags.insert(pair[1].replace("\\-", "-"));
            }
        }
    }
    flags
}

/// The flags a page documents: those in the heads of items that start with a flag
/// (`.It Fl -socket Ar path`, `.It Fl n Ar count , Fl -lines Ar count`).
fn documented_flags(page: &str) -> BTreeSet<String> {
    let heads: Vec<Vec<String>> = item_heads(page)
        .into_iter()
        .filter(|h| h.first().map(String::as_str) == Some("Fl"))
        .collect();
    flags_in(&heads)
}

/// Every flag a page mentions anywhere in its macros (synopsis, items, text).
fn mentioned_flags(page: &str) -> BTreeSet<String> {
    flags_in(&macro_lines(page))
}

/// Mentioned flags that `known` (as `-long` and single letters) does not have.
fn unknown_flags(page: &str, known: &BTreeSet<String>) -> Vec<String> {
    let mut bad = Vec::new();
    for flag in mentioned_flags(page) {
        if flag == "-" {
            continue; // `Fl -` is the `--` separator
        }
        if flag.starts_with('-') {
            if !known.contains(&flag) {
                bad.push(format!("-{flag}"));
            }
        } else {
            for c in flag.chars() {
                if !known.contains(&c.to_string()) {
                    bad.push(format!("-{c}"));
                }
            }
        }
    }
    bad
}

/// Whether an item head of the page starts with `Cm NAME` (a command or a config key).
fn has_item(page: &str, name: &str) -> bool {
    item_heads(page)
        .iter()
        .any(|h| h.len() >= 2 && h[0] == "Cm" && h[1] == name)
}

/// Whether the page mentions `Cm VALUE` anywhere (a possible value of an option).
fn has_cm(page: &str, value: &str) -> bool {
    macro_lines(page)
        .iter()
        .any(|w| w.windows(2).any(|p| p[0] == "Cm" && p[1] == value))
}

/// Every (command path, argument) of a clap command and its subcommands.
fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
    for arg in cmd.get_arguments() {
        out.push((path.to_string(), arg.clone()));
    }
    for sub in cmd.get_subcommands() {
        walk(sub, &format!("{path} {}", sub.get_name()), out);
    }
}

#[test]
fn man_pages_document_every_subcommand_and_flag() {
    let mut missing = Vec::new();
    for (bin, cmd, page_path) in programs() {
        let page = read(page_path);
        let items = documented_flags(&page);
        for sub in cmd.get_subcommands() {
            if !has_item(&page, sub.get_name()) {
                missing.push(format!(
                    "{page_path}: subcommand `{bin} {}` has no `.It Cm {}` item",
                    sub.get_name(),
                    sub.get_name()
                ));
            }
        }
        let mut args = Vec::new();
        walk(&cmd, bin, &mut args);
        let mut known = BTreeSet::new();
        for (path, arg) in &args {
            if arg.is_hide_set() {
                continue;
            }
            if let Some(long) = arg.get_long() {
                known.insert(format!("-{long}"));
                if !items.contains(&format!("-{long}")) {
                    missing.push(format!(
                        "{page_path}: `{path} --{long}` has no item (`.It Fl -{long} ...`)"
                    ));
                }
            }
            if let Some(short) = arg.get_short() {
                known.insert(short.to_string());
                if !items.contains(&short.to_string()) {
                    missing.push(format!(
                        "{page_path}: `{path} -{short}` has no item (`.It Fl {short} ...`)"
                    ));
                }
            }
            if arg.get_action().takes_values() {
                for value in arg.get_possible_values() {
                    if !value.is_hide_set() && !has_cm(&page, value.get_name()) {
                        missing.push(format!(
                            "{page_path}: value `{}` of `{path} --{}` is not documented (`Cm {}`)",
                            value.get_name(),
                            arg.get_long().unwrap_or_default(),
                            value.get_name()
                        ));
                    }
                }
            }
        }
        // And the other way: a flag that no longer exists must not be mentioned.
        let mut pages = vec![(page_path, page)];
        if bin == "chatd" {
            pages.push(("man/chatd.toml.5", read("man/chatd.toml.5")));
        }
        for (path, text) in &pages {
            for flag in unknown_flags(text, &known) {
                missing.push(format!(
                    "{path}: mentions `{flag}`, which `{bin}` does not have"
                ));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the man pages and the clap flag definitions disagree:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn man_pages_have_the_required_sections() {
    let required: &[(&str, &[&str])] = &[
        (
            "man/chatctl.1",
            &[
                "NAME",
                "SYNOPSIS",
                "DESCRIPTION",
                "OPTIONS",
                "COMMANDS",
                "EXIT STATUS",
                "FILES",
                "ENVIRONMENT",
                "EXAMPLES",
                "SEE ALSO",
            ],
        ),
        (
            "man/chatd.8",
            &[
                "NAME",
                "SYNOPSIS",
                "DESCRIPTION",
                "OPTIONS",
                "EXIT STATUS",
                "FILES",
                "ENVIRONMENT",
                "SIGNALS",
                "EXAMPLES",
                "SEE ALSO",
            ],
        ),
        (
            "man/chatd.toml.5",
            &[
                "NAME",
                "SYNOPSIS",
                "DESCRIPTION",
                "KEYS",
                "FILES",
                "ENVIRONMENT",
                "SIGNALS",
                "EXAMPLES",
                "SEE ALSO",
            ],
        ),
    ];
    let mut missing = Vec::new();
    for (path, sections) in required {
        let page = read(path);
        let have: Vec<String> = macro_lines(&page)
            .into_iter()
            .filter(|w| w.first().map(String::as_str) == Some("Sh"))
            .map(|w| w[1..].join(" "))
            .collect();
        for s in *sections {
            if !have.iter().any(|h| h == s) {
                missing.push(format!("{path}: no `.Sh {s}` section"));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Config keys.

/// The config keys as the flag definitions imply them: every chatd long flag but `--config`,
/// `--help` and `--version`, with `_` for `-`, plus `log_level` (file only).
fn keys_from_flags() -> BTreeSet<String> {
    let mut keys: BTreeSet<String> = chatd::config::Flags::command()
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !["config", "help", "version"].contains(l))
        .map(|l| l.replace('-', "_"))
        .collect();
    keys.insert("log_level".to_string());
    keys
}

/// The keys `config::File` accepts, as its parser lists them when it meets an unknown one.
fn keys_from_file_parser() -> BTreeSet<String> {
    let err = chatd::config::parse_file(Path::new("probe.toml"), "zz_not_a_key = 1\n")
        .expect_err("an unknown key is refused")
        .to_string();
    let list = err
        .split("expected one of")
        .nth(1)
        .unwrap_or_else(|| panic!("the unknown-key error lists no keys: {err}"));
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

#[test]
fn every_flag_has_a_config_key() {
    assert_eq!(
        keys_from_flags(),
        keys_from_file_parser(),
        "chatd's flags (left, plus log_level) and config::File's keys (right) must match: \
         every flag has a key of the same name"
    );
}

/// Defaults as chatd resolves them with nothing set, by key.
fn defaults() -> Vec<(&'static str, String)> {
    let flags = chatd::config::Flags {
        listen: Some("127.0.0.1:0".into()),
        state_dir: Some("/nonexistent/state".into()),
        socket: Some("/nonexistent/control.sock".into()),
        ..Default::default()
    };
    let c = chatd::config::resolve_with(&flags, &chatd::config::File::default(), None)
        .expect("a relay with defaults resolves");
    let level = chatd::daemon::level_filter(None).to_string().to_lowercase();
    vec![
        ("key_bits", c.key_bits.to_string()),
        ("max_connections", c.max_connections.to_string()),
        ("max_queue", c.limits.max_queue.to_string()),
        (
            "handshake_timeout",
            (c.limits.handshake_timeout_ms / 1000).to_string(),
        ),
        (
            "idle_timeout",
            (c.limits.idle_timeout_ms / 1000).to_string(),
        ),
        ("max_write_buffer", c.max_write_buffer.to_string()),
        ("max_control_clients", c.max_control_clients.to_string()),
        ("log_level", format!("\"{level}\"")),
    ]
}

/// The text of the item `.It Cm KEY ...` of a page, up to the next item or list end.
fn item_text(page: &str, key: &str) -> Option<String> {
    let mut lines = page.lines();
    lines.find(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w.len() >= 3 && w[0] == ".It" && w[1] == "Cm" && w[2] == key
    })?;
    let body: Vec<&str> = lines
        .take_while(|l| !l.starts_with(".It") && !l.starts_with(".El"))
        .collect();
    Some(body.join("\n"))
}

#[test]
fn config_keys_are_documented_with_their_defaults() {
    let page = read("man/chatd.toml.5");
    let mut missing = Vec::new();
    for key in keys_from_flags().union(&keys_from_file_parser()) {
        if !has_item(&page, key) {
            missing.push(format!(
                "man/chatd.toml.5: key `{key}` has no `.It Cm {key}` item"
            ));
        }
    }
    for (key, value) in defaults() {
        let Some(text) = item_text(&page, key) else {
            continue; // reported above
        };
        let value = value.trim_matches('"');
        let said = text.contains(&format!("Default: {value}"))
            || text.contains(&format!("Default:\n.Ql {value}"));
        if !said {
            missing.push(format!(
                "man/chatd.toml.5: key `{key}` does not say `Default: {value}`"
            ));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

#[test]
fn example_config_has_every_key_with_its_default() {
    let example = read("contrib/chatd.toml.example");
    // As shipped it sets nothing.
    let parsed = chatd::config::parse_file(Path::new("contrib/chatd.toml.example"), &example)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        parsed,
        chatd::config::File::default(),
        "every key is commented out"
    );

    // Uncommented, every `# key = value` line must be a valid setting.
    let mut settings = Vec::new();
    for line in example.lines() {
        let Some(rest) = line.strip_prefix("# ") else {
            continue;
        };
        let Some((key, value)) = rest.split_once(" = ") else {
            continue;
        };
        if !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            settings.push((key.to_string(), value.trim().to_string()));
        }
    }
    let uncommented: String = settings
        .iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    chatd::config::parse_file(Path::new("uncommented example"), &uncommented)
        .unwrap_or_else(|e| panic!("the example's settings, uncommented, are invalid: {e}"));

    let mut problems = Vec::new();
    for key in keys_from_flags().union(&keys_from_file_parser()) {
        let n = settings.iter().filter(|(k, _)| k == key).count();
        if n != 1 {
            problems.push(format!(
                "contrib/chatd.toml.example: `# {key} = ...` appears {n} times, not once"
            ));
        }
    }
    for (key, default) in defaults() {
        if let Some((_, v)) = settings.iter().find(|(k, _)| k == key) {
            if *v != default {
                problems.push(format!(
                    "contrib/chatd.toml.example: `{key} = {v}`, but the default is {default}"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// The --json formats in chatctl.1.

/// The keys of a flat JSON object as written, in order (`"key":` at the top level).
fn json_keys(object: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let (mut depth, mut in_str, mut escaped) = (0, false, false);
    let mut current = String::new();
    let chars: Vec<char> = object.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
                // A string at depth 1 followed by ':' is a key.
                if depth == 1 && chars.get(i + 1) == Some(&':') {
                    keys.push(current.clone());
                }
            } else {
                current.push(c);
            }
        } else {
            match c {
                '"' => {
                    in_str = true;
                    current.clear();
                }
                '{' | '[' => depth += 1,
                '}' | ']' => depth -= 1,
                _ => {}
            }
        }
        i += 1;
    }
    keys
}

/// The JSON objects shown in the literal displays of a page (a display may wrap one object
/// over several lines).
fn json_examples(page: &str) -> Vec<String> {
    let mut objects = Vec::new();
    let mut in_literal = false;
    let mut text = String::new();
    for line in page.lines() {
        if line.starts_with(".Bd -literal") {
            in_literal = true;
            text.clear();
        } else if line.starts_with(".Ed") {
            in_literal = false;
            for part in text.split_inclusive('}') {
                if let Some(start) = part.find('{') {
                    objects.push(part[start..].to_string());
                }
            }
        } else if in_literal {
            text.push_str(line.trim_start());
        }
    }
    objects
}

#[test]
fn chatctl_page_shows_the_json_keys_format_rs_prints() {
    use chatd::cli::format;
    use chatd::proto::control::{Dir, MsgState, PeerView, Record, RecordBody, Sent, StatusView};

    let record = |body| Record {
        seq: 1,
        time_ms: 0,
        body,
    };
    let peer = |presented: Option<&str>| PeerView {
        user: "bob".into(),
        online: true,
        trust: "pinned".into(),
        fingerprint: "SHA256:x".into(),
        presented: presented.map(String::from),
    };
    let status = StatusView {
        user: Some("alice".into()),
        fingerprint: "SHA256:x".into(),
        roles: vec!["member".into()],
        relay: Some("r:9999".into()),
        connected: true,
        relay_error: None,
        listen: None,
        peers_online: 1,
        outbox_pending: 0,
        uptime_s: 1,
        version: "0".into(),
        state_dir: "/s".into(),
        relay_fingerprint: None,
    };
    let sent = Sent {
        id: [0; 16],
        to: "bob".into(),
        state: MsgState::Queued,
    };
    let outputs: Vec<(&str, String)> = vec![
        (
            "tail message",
            format::record_json(&record(RecordBody::Message {
                id: [0; 16],
                from: "alice".into(),
                to: "bob".into(),
                dir: Dir::In,
                text: "hi".into(),
            })),
        ),
        (
            "tail presence",
            format::record_json(&record(RecordBody::Presence {
                user: "carol".into(),
                online: false,
            })),
        ),
        (
            "tail receipt",
            format::record_json(&record(RecordBody::Receipt {
                id: [0; 16],
                to: "bob".into(),
                state: MsgState::Delivered,
                reason: None,
            })),
        ),
        (
            "tail link",
            format::record_json(&record(RecordBody::Link {
                up: true,
                reason: None,
                online: vec!["bob".into()],
                peers_online: 1,
            })),
        ),
        ("send", format::sent(&[sent], true).remove(0)),
        ("who", format::peers(&[peer(None)], true).remove(0)),
        (
            "who (changed)",
            format::peers(&[peer(Some("SHA256:y"))], true).remove(0),
        ),
        ("status", format::status(&status, true).remove(0)),
        (
            "fingerprint",
            format::fingerprint("alice", "SHA256:x", true),
        ),
        ("trust, forget", format::done("ok", true)),
    ];
    let shown: Vec<Vec<String>> = json_examples(&read("man/chatctl.1"))
        .iter()
        .map(|o| json_keys(o))
        .collect();
    let mut missing = Vec::new();
    for (what, out) in outputs {
        let keys = json_keys(&out);
        if !shown.contains(&keys) {
            missing.push(format!(
                "{what}: chatctl prints keys {keys:?} ({out}), which no example shows"
            ));
        }
    }
    assert!(
        missing.is_empty(),
        "man/chatctl.1 must show each --json object with its keys in order:\n  {}",
        missing.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// The settings table: what each page says about a setting, checked against its one definition
// (`chatd::config::SETTINGS`) rather than against what resolving happens to give.

use chatd::config::{Sighup, SETTINGS};

/// The lines of `page` from the first that `start` accepts up to (not with) the next that `end`
/// accepts.
fn span<'a>(page: &'a str, start: &str, end: &[&str]) -> Vec<&'a str> {
    let mut lines = page.lines().skip_while(|l| !l.starts_with(start));
    let Some(first) = lines.next() else {
        panic!("no line starting with {start:?}");
    };
    std::iter::once(first)
        .chain(lines.take_while(|l| !end.iter().any(|e| l.starts_with(e))))
        .collect()
}

/// The settings named with `Cm` in `lines`, split at the sentence "Changes to ...": those before
/// (what SIGHUP applies) and those after (what it does not).
fn sighup_keys(lines: &[&str]) -> (BTreeSet<String>, BTreeSet<String>) {
    let keys: BTreeSet<&str> = SETTINGS.iter().map(|s| s.key).collect();
    let (mut before, mut after) = (BTreeSet::new(), BTreeSet::new());
    let mut seen_changes = false;
    for line in lines {
        if line.starts_with("Changes to") {
            seen_changes = true;
        }
        let Some(macros) = line.strip_prefix('.') else {
            continue;
        };
        // `.Pq Cm user , connect , listen ,`: mdoc keeps `Cm` on after the commas.
        let words = macros.split_whitespace().skip_while(|w| *w != "Cm");
        for w in words {
            if keys.contains(w) {
                let side = if seen_changes {
                    &mut after
                } else {
                    &mut before
                };
                side.insert(w.to_string());
            }
        }
    }
    assert!(seen_changes, "no sentence \"Changes to ...\" in {lines:?}");
    (before, after)
}

fn keys_where(f: impl Fn(Sighup) -> bool) -> BTreeSet<String> {
    SETTINGS
        .iter()
        .filter(|s| f(s.sighup))
        .map(|s| s.key.to_string())
        .collect()
}

#[test]
fn man_pages_say_what_sighup_does_with_each_setting() {
    let applied = keys_where(|s| s == Sighup::Apply);
    let restart = keys_where(|s| s == Sighup::Restart);
    let toml5 = read("man/chatd.toml.5");
    let chatd8 = read("man/chatd.8");
    let pages = [
        (
            "man/chatd.toml.5 SIGNALS",
            span(&toml5, ".Sh SIGNALS", &[".Sh"]),
        ),
        (
            "man/chatd.8 SIGHUP",
            span(&chatd8, ".It Dv SIGHUP", &[".It", ".El"]),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, lines) in &pages {
        let (before, after) = sighup_keys(lines);
        if before != applied {
            wrong.push(format!(
                "{what}: says SIGHUP applies {before:?}; the table applies {applied:?}"
            ));
        }
        if !restart.is_subset(&after) || !after.is_disjoint(&applied) {
            wrong.push(format!(
                "{what}: says changes to {after:?} need a restart; the table says {restart:?}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn example_config_groups_the_keys_as_sighup_treats_them() {
    let example = read("contrib/chatd.toml.example");
    let mut header = "";
    let mut wrong = Vec::new();
    for line in example.lines() {
        if line.starts_with("# ---") {
            header = line;
            continue;
        }
        let Some(key) = line
            .strip_prefix("# ")
            .and_then(|rest| rest.split_once(" = "))
            .map(|(k, _)| k)
        else {
            continue;
        };
        let Some(setting) = SETTINGS.iter().find(|s| s.key == key) else {
            continue; // an unknown key is every_flag_has_a_config_key's to report
        };
        let says = if header.contains("needs a restart") {
            Some(Sighup::Restart)
        } else if header.contains("applied again on SIGHUP") {
            Some(Sighup::Apply)
        } else {
            None
        };
        let fits = match setting.sighup {
            Sighup::Unused => says.is_none(),
            other => says == Some(other),
        };
        if !fits {
            wrong.push(format!(
                "contrib/chatd.toml.example: `{key}` ({:?} on SIGHUP) sits under {header:?}",
                setting.sighup
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn man_pages_give_each_setting_its_environment_and_default() {
    let toml5 = read("man/chatd.toml.5");
    let chatd8 = read("man/chatd.8");
    let example = read("contrib/chatd.toml.example");
    let mut wrong = Vec::new();
    for s in SETTINGS {
        for var in s.env {
            for (path, page) in [("man/chatd.8", &chatd8), ("man/chatd.toml.5", &toml5)] {
                let listed = item_heads(page).iter().any(|h| {
                    h.first().map(String::as_str) == Some("Ev") && h.contains(&var.to_string())
                });
                if !listed {
                    wrong.push(format!(
                        "{path}: `{}` reads ${var}, which ENVIRONMENT has no item for",
                        s.key
                    ));
                }
            }
        }
        let Some(default) = s.default.map(|f| f()) else {
            continue;
        };
        let said =
            item_text(&toml5, s.key).is_some_and(|t| t.contains(&format!("Default: {default}")));
        if !said {
            wrong.push(format!(
                "man/chatd.toml.5: `{}` does not say `Default: {default}`",
                s.key
            ));
        }
        if !example
            .lines()
            .any(|l| l == format!("# {} = {default}", s.key))
        {
            wrong.push(format!(
                "contrib/chatd.toml.example: no line `# {} = {default}`",
                s.key
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The default control socket is named the same way wherever a user reads about it: each page
/// that mentions the default names all three places `config::default_socket` picks from.
#[test]
fn the_default_socket_reads_the_same_everywhere() {
    let places = [
        "XDG_RUNTIME_DIR/chatd/control.sock",
        "/run/chatd/control.sock",
        "/tmp/chatd-UID/control.sock",
    ];
    let mut texts: Vec<(String, String)> = [
        "man/chatd.8",
        "man/chatctl.1",
        "man/chatd.toml.5",
        "README.md",
        "contrib/chatd.toml.example",
        "contrib/examples/echo-bot",
        "contrib/examples/log-forwarder",
    ]
    .iter()
    .map(|p| (p.to_string(), read(p)))
    .collect();
    for (name, cmd) in programs().into_iter().map(|(n, c, _)| (n, c)) {
        let mut cmd = cmd;
        texts.push((format!("{name} --help"), cmd.render_long_help().to_string()));
    }
    for (what, text) in texts {
        for place in places {
            assert!(
                text.contains(place),
                "{what} does not name the default socket {place}"
            );
        }
    }
}

/// The README's first two commands: the test command is exactly what `.ci/run` runs, and the
/// quickstart uses neither the port nor the state directory of the first command, so a reader
/// who leaves that running can still follow the quickstart literally.
#[test]
fn readme_commands_match_ci_and_the_quickstart_does_not_collide() {
    let readme = read("README.md");
    let first_block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("README starts with a sh block");
    let lines: Vec<&str> = first_block.lines().collect();
    assert_eq!(lines.len(), 2, "two commands: {lines:?}");
    let test_cmd = lines[1].split('#').next().unwrap_or("").trim();
    let ci = read(".ci/run");
    let ci_test = ci
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .expect(".ci/run has a last command");
    assert!(
        ci_test.trim().ends_with(test_cmd),
        ".ci/run's last command `{ci_test}` is not the README's `{test_cmd}`"
    );
    let run_cmd = lines[0];
    let port = run_cmd
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the first command listens on a loopback port");
    let quick = &readme[readme.find("## Quickstart").expect("a quickstart")..];
    let quick = &quick[..quick.find("\n## ").map_or(quick.len(), |i| i + 1)];
    assert!(
        !quick.contains(&format!("127.0.0.1:{port}")),
        "the quickstart reuses port {port}"
    );
    assert!(
        !run_cmd.contains("--state-dir"),
        "the first command uses the default state dir"
    );
    assert!(
        quick.matches("--state-dir").count() >= 2 && quick.matches("--socket").count() >= 2,
        "every quickstart daemon has its own state dir and socket"
    );
    for n in 1..=4 {
        assert!(
            quick.contains(&format!("Terminal {n}")),
            "the quickstart names terminal {n}"
        );
    }
}

/// Every key and command the full-screen chat's help lists (`chatctl chat --help`, `/help`) is
/// an `Ic` item of man/chatctl.1, so the page cannot fall behind the keys.
#[test]
fn chat_keys_and_commands_are_in_the_man_page() {
    let cmd = chatd::cli::Args::command();
    let chat = cmd
        .find_subcommand("chat")
        .expect("chatctl has a chat command");
    let help = chat
        .get_after_long_help()
        .expect("chat --help lists its keys")
        .to_string();
    let page = read("man/chatctl.1");
    let ic: BTreeSet<String> = macro_lines(&page)
        .iter()
        .flat_map(|w| {
            w.windows(2)
                .filter(|p| p[0] == "Ic")
                .map(|p| p[1].to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut keys = Vec::new();
    for line in help.lines().filter(|l| l.starts_with("  ")) {
        let column = line.trim_start().split("  ").next().unwrap_or("");
        if column.starts_with('/') {
            keys.push(column.split(' ').next().unwrap_or("").to_string());
        } else {
            keys.extend(column.split(", ").map(str::to_string));
        }
    }
    assert!(keys.len() > 20, "found the keys: {keys:?}");
    let missing: Vec<&String> = keys.iter().filter(|k| !ic.contains(*k)).collect();
    assert!(
        missing.is_empty(),
        "man/chatctl.1 has no `.It Ic` for {missing:?} of chat's keys and commands"
    );
}
