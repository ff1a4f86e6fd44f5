complete -c chatd -s c -l config -d 'Config file (default: $CONFIGURATION_DIRECTORY/chatd.toml, else $XDG_CONFIG_HOME/chatd/chatd.toml, else ~/.config/chatd/chatd.toml)' -r -F
complete -c chatd -l user -d 'Your user name (1-32 of a-z 0-9 . _ -); makes this daemon a member' -r
complete -c chatd -l connect -d 'Relay to connect to as a member (port defaults to 9999); SHA256:...@HOST:PORT pins its key' -r
complete -c chatd -l relay-fingerprint -d 'Member: the relay\'s key fingerprint (SHA256:...); unset pins the key seen first' -r
complete -c chatd -l listen -d 'Address to serve the relay on (e.g. 0.0.0.0:9999; port 0 picks a free one)' -r
complete -c chatd -l state-dir -d 'State directory for the identity key and database (mode 0700)' -r -F
complete -c chatd -l socket -d 'Control socket path [default: $CHATD_SOCKET, else $RUNTIME_DIRECTORY/control.sock, else $XDG_RUNTIME_DIR/chatd/control.sock, else /run/chatd/control.sock for root, else /tmp/chatd-UID/control.sock]' -r -F
complete -c chatd -l key-bits -d 'RSA key size for a new identity' -r -f -a "2048\t''
3072\t''
4096\t''"
complete -c chatd -l max-connections -d 'Relay: most simultaneous member connections' -r
complete -c chatd -l max-queue -d 'Relay: most items queued per user before new ones are refused' -r
complete -c chatd -l max-queue-bytes -d 'Relay: most bytes queued per user before new items are refused' -r
complete -c chatd -l max-names-per-key -d 'Relay: most names one key may register' -r
complete -c chatd -l new-names-per-minute -d 'Relay: most new names registered per minute, by everyone together' -r
complete -c chatd -l directory-push-max -d 'Relay: up to this many names, every login gets the whole directory and every join and leave goes to everyone' -r
complete -c chatd -l max-subscriptions -d 'Relay: most names one connection may follow for joins and leaves' -r
complete -c chatd -l handshake-timeout -d 'Relay: seconds a new connection has to log in' -r
complete -c chatd -l idle-timeout -d 'Relay: seconds of silence before a connection is closed' -r
complete -c chatd -l max-write-buffer -d 'Bytes queued for one connection before it is cut off as a slow reader' -r
complete -c chatd -l max-fanout -d 'Member: most peers `send --all` may reach; with more online it sends nothing' -r
complete -c chatd -l max-held-per-sender -d 'Member: most messages held from one sender not introduced yet or whose key changed' -r
complete -c chatd -l max-held-bytes-per-sender -d 'Member: most bytes held from one such sender' -r
complete -c chatd -l max-held -d 'Member: most messages held from all such senders together' -r
complete -c chatd -l max-held-bytes -d 'Member: most bytes held from all such senders together' -r
complete -c chatd -l control-idle-timeout -d 'Seconds a control client may stay connected without a request (not while a tail follows or a send waits)' -r
complete -c chatd -l max-control-clients -d 'Most simultaneous control-socket clients' -r
complete -c chatd -s h -l help -d 'Print help'
complete -c chatd -s V -l version -d 'Print version'
