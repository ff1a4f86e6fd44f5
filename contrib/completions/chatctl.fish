# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_chatctl_global_optspecs
    string join \n socket= json h/help V/version
end

function __fish_chatctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_chatctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_chatctl_using_subcommand
    set -l cmd (__fish_chatctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c chatctl -n "__fish_chatctl_needs_command" -l socket -d 'Control socket of chatd [default: $CHATD_SOCKET, else $XDG_RUNTIME_DIR/chatd/control.sock, else /run/chatd/control.sock for root, else /tmp/chatd-UID/control.sock]' -r -F
complete -c chatctl -n "__fish_chatctl_needs_command" -l json -d 'One JSON object per line on stdout'
complete -c chatctl -n "__fish_chatctl_needs_command" -s h -l help -d 'Print help'
complete -c chatctl -n "__fish_chatctl_needs_command" -s V -l version -d 'Print version'
complete -c chatctl -n "__fish_chatctl_needs_command" -f -a "send" -d 'Send a message: `send USER [TEXT...]`, `send USER... -- [TEXT...]`, `send --all [TEXT...]`; without TEXT every line of stdin is one message, one result printed per line in order (lines already waiting go out together, up to 256, without waiting for each answer; on a terminal, one line on stderr says what send waits for first)'
complete -c chatctl -n "__fish_chatctl_needs_command" -f -a "tail" -d 'Print history (last N records), then with -f new records as they come'
complete -c chatctl -n "__fish_chatctl_needs_command" -f -a "chat" -d 'Converse: full-screen on a terminal; with stdin or stdout not a terminal, line mode (stdin lines sent to USER, USER\'s messages printed); with --json, one two-way JSON-lines stream (requests with an "id" in, replies and every new record out). Keys and commands of the full-screen chat: chatctl chat --help, or /help inside it'
complete -c chatctl -n "__fish_chatctl_needs_command" -f -a "who" -d 'List your contacts: name, online, trust (trusted|pinned|changed), fingerprint; with --all, every name on the relay (a page at a time); on a relay, its registrations'
complete -c chatctl -n "__fish_chatctl_needs_command" -f -a "status" -d 'Show own name and fingerprint, roles, relay, connection, outbox, uptime, version'
complete -c chatctl -n "__fish_chatctl_needs_command" -f -a "fingerprint" -d 'Print own fingerprint, or USER\'s pinned one'
complete -c chatctl -n "__fish_chatctl_needs_command" -f -a "trust" -d 'Accept USER\'s current key after checking FINGERPRINT out of band'
complete -c chatctl -n "__fish_chatctl_needs_command" -f -a "forget" -d 'Relay: drop USER\'s name binding and queue; member: drop USER\'s pin and held messages'
complete -c chatctl -n "__fish_chatctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c chatctl -n "__fish_chatctl_using_subcommand send" -l wait -d 'Wait for this state before exiting' -r -f -a "none\t'Until sealed and stored in the outbox'
relay\t'Until the relay has taken custody'
delivered\t'Until the recipient\'s daemon has stored it'"
complete -c chatctl -n "__fish_chatctl_using_subcommand send" -l timeout -d 'Seconds to wait at most with --wait' -r
complete -c chatctl -n "__fish_chatctl_using_subcommand send" -l socket -d 'Control socket of chatd [default: $CHATD_SOCKET, else $XDG_RUNTIME_DIR/chatd/control.sock, else /run/chatd/control.sock for root, else /tmp/chatd-UID/control.sock]' -r -F
complete -c chatctl -n "__fish_chatctl_using_subcommand send" -l all -d 'Send to every peer online now'
complete -c chatctl -n "__fish_chatctl_using_subcommand send" -l json -d 'One JSON object per line on stdout'
complete -c chatctl -n "__fish_chatctl_using_subcommand send" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c chatctl -n "__fish_chatctl_using_subcommand tail" -s n -l lines -d 'How many of the last records to print [default: 10; all newer than SEQ with --since]' -r
complete -c chatctl -n "__fish_chatctl_using_subcommand tail" -l since -d 'Only records with a larger seq' -r
complete -c chatctl -n "__fish_chatctl_using_subcommand tail" -l with -d 'Only records to or from USER (and USER\'s presence)' -r -f -a "(__fish_chatctl_users)"
complete -c chatctl -n "__fish_chatctl_using_subcommand tail" -l kind -d 'Only records of these kinds (comma-separated: message,presence,receipt,key)' -r -f -a "message\t''
presence\t''
receipt\t''
key\t''
link\t''"
complete -c chatctl -n "__fish_chatctl_using_subcommand tail" -l socket -d 'Control socket of chatd [default: $CHATD_SOCKET, else $XDG_RUNTIME_DIR/chatd/control.sock, else /run/chatd/control.sock for root, else /tmp/chatd-UID/control.sock]' -r -F
complete -c chatctl -n "__fish_chatctl_using_subcommand tail" -s f -l follow -d 'Keep printing new records until interrupted'
complete -c chatctl -n "__fish_chatctl_using_subcommand tail" -l json -d 'One JSON object per line on stdout'
complete -c chatctl -n "__fish_chatctl_using_subcommand tail" -s h -l help -d 'Print help'
complete -c chatctl -n "__fish_chatctl_using_subcommand chat" -s n -l lines -d 'History records to show first [default: 100 on the full screen, else 0: only new ones]' -r
complete -c chatctl -n "__fish_chatctl_using_subcommand chat" -l since -d 'Start after this seq (line mode and --json: print the records after SEQ first)' -r
complete -c chatctl -n "__fish_chatctl_using_subcommand chat" -l socket -d 'Control socket of chatd [default: $CHATD_SOCKET, else $XDG_RUNTIME_DIR/chatd/control.sock, else /run/chatd/control.sock for root, else /tmp/chatd-UID/control.sock]' -r -F
complete -c chatctl -n "__fish_chatctl_using_subcommand chat" -l json -d 'One JSON object per line on stdout'
complete -c chatctl -n "__fish_chatctl_using_subcommand chat" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c chatctl -n "__fish_chatctl_using_subcommand who" -l prefix -d 'With --all: only names that start with P' -r
complete -c chatctl -n "__fish_chatctl_using_subcommand who" -l socket -d 'Control socket of chatd [default: $CHATD_SOCKET, else $XDG_RUNTIME_DIR/chatd/control.sock, else /run/chatd/control.sock for root, else /tmp/chatd-UID/control.sock]' -r -F
complete -c chatctl -n "__fish_chatctl_using_subcommand who" -l all -d 'Every name on the relay, not only your contacts (names you have not pinned show trust `bound`)'
complete -c chatctl -n "__fish_chatctl_using_subcommand who" -l json -d 'One JSON object per line on stdout'
complete -c chatctl -n "__fish_chatctl_using_subcommand who" -s h -l help -d 'Print help'
complete -c chatctl -n "__fish_chatctl_using_subcommand status" -l socket -d 'Control socket of chatd [default: $CHATD_SOCKET, else $XDG_RUNTIME_DIR/chatd/control.sock, else /run/chatd/control.sock for root, else /tmp/chatd-UID/control.sock]' -r -F
complete -c chatctl -n "__fish_chatctl_using_subcommand status" -l json -d 'One JSON object per line on stdout'
complete -c chatctl -n "__fish_chatctl_using_subcommand status" -s h -l help -d 'Print help'
complete -c chatctl -n "__fish_chatctl_using_subcommand fingerprint" -l socket -d 'Control socket of chatd [default: $CHATD_SOCKET, else $XDG_RUNTIME_DIR/chatd/control.sock, else /run/chatd/control.sock for root, else /tmp/chatd-UID/control.sock]' -r -F
complete -c chatctl -n "__fish_chatctl_using_subcommand fingerprint" -l json -d 'One JSON object per line on stdout'
complete -c chatctl -n "__fish_chatctl_using_subcommand fingerprint" -s h -l help -d 'Print help'
complete -c chatctl -n "__fish_chatctl_using_subcommand trust" -l socket -d 'Control socket of chatd [default: $CHATD_SOCKET, else $XDG_RUNTIME_DIR/chatd/control.sock, else /run/chatd/control.sock for root, else /tmp/chatd-UID/control.sock]' -r -F
complete -c chatctl -n "__fish_chatctl_using_subcommand trust" -l json -d 'One JSON object per line on stdout'
complete -c chatctl -n "__fish_chatctl_using_subcommand trust" -s h -l help -d 'Print help'
complete -c chatctl -n "__fish_chatctl_using_subcommand forget" -l socket -d 'Control socket of chatd [default: $CHATD_SOCKET, else $XDG_RUNTIME_DIR/chatd/control.sock, else /run/chatd/control.sock for root, else /tmp/chatd-UID/control.sock]' -r -F
complete -c chatctl -n "__fish_chatctl_using_subcommand forget" -l json -d 'One JSON object per line on stdout'
complete -c chatctl -n "__fish_chatctl_using_subcommand forget" -s h -l help -d 'Print help'
complete -c chatctl -n "__fish_chatctl_using_subcommand help; and not __fish_seen_subcommand_from send tail chat who status fingerprint trust forget help" -f -a "send" -d 'Send a message: `send USER [TEXT...]`, `send USER... -- [TEXT...]`, `send --all [TEXT...]`; without TEXT every line of stdin is one message, one result printed per line in order (lines already waiting go out together, up to 256, without waiting for each answer; on a terminal, one line on stderr says what send waits for first)'
complete -c chatctl -n "__fish_chatctl_using_subcommand help; and not __fish_seen_subcommand_from send tail chat who status fingerprint trust forget help" -f -a "tail" -d 'Print history (last N records), then with -f new records as they come'
complete -c chatctl -n "__fish_chatctl_using_subcommand help; and not __fish_seen_subcommand_from send tail chat who status fingerprint trust forget help" -f -a "chat" -d 'Converse: full-screen on a terminal; with stdin or stdout not a terminal, line mode (stdin lines sent to USER, USER\'s messages printed); with --json, one two-way JSON-lines stream (requests with an "id" in, replies and every new record out). Keys and commands of the full-screen chat: chatctl chat --help, or /help inside it'
complete -c chatctl -n "__fish_chatctl_using_subcommand help; and not __fish_seen_subcommand_from send tail chat who status fingerprint trust forget help" -f -a "who" -d 'List your contacts: name, online, trust (trusted|pinned|changed), fingerprint; with --all, every name on the relay (a page at a time); on a relay, its registrations'
complete -c chatctl -n "__fish_chatctl_using_subcommand help; and not __fish_seen_subcommand_from send tail chat who status fingerprint trust forget help" -f -a "status" -d 'Show own name and fingerprint, roles, relay, connection, outbox, uptime, version'
complete -c chatctl -n "__fish_chatctl_using_subcommand help; and not __fish_seen_subcommand_from send tail chat who status fingerprint trust forget help" -f -a "fingerprint" -d 'Print own fingerprint, or USER\'s pinned one'
complete -c chatctl -n "__fish_chatctl_using_subcommand help; and not __fish_seen_subcommand_from send tail chat who status fingerprint trust forget help" -f -a "trust" -d 'Accept USER\'s current key after checking FINGERPRINT out of band'
complete -c chatctl -n "__fish_chatctl_using_subcommand help; and not __fish_seen_subcommand_from send tail chat who status fingerprint trust forget help" -f -a "forget" -d 'Relay: drop USER\'s name binding and queue; member: drop USER\'s pin and held messages'
complete -c chatctl -n "__fish_chatctl_using_subcommand help; and not __fish_seen_subcommand_from send tail chat who status fingerprint trust forget help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'

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
