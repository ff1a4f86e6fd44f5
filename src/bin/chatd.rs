//! chatd: the daemon. Parses flags and config, sets up logging, and hands over to `daemon::run`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let flags = chatd::config::Flags::parse();
    let cfg = match chatd::config::resolve(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chatd: {e}");
            return ExitCode::from(2);
        }
    };
    let mut logger = env_logger::Builder::new();
    if let Ok(spec) = std::env::var("RUST_LOG") {
        logger.parse_filters(&spec);
    } else {
        // Everything passes env_logger; log::set_max_level decides, so SIGHUP can change it.
        logger.filter_level(log::LevelFilter::Trace);
    }
    if chatd::daemon::systemd::stderr_is_journal() {
        // journald adds the time and pid; the `<N>` prefix gives each line its priority.
        use std::io::Write;
        logger.format(|buf, rec| {
            let prio = chatd::daemon::systemd::syslog_priority(rec.level());
            writeln!(buf, "<{prio}>{}", rec.args())
        });
    } else {
        logger.format_timestamp_millis();
    }
    logger.init();
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(chatd::daemon::level_filter(cfg.log_level.as_deref()));
    }
    match chatd::daemon::run(cfg, flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(1)
        }
    }
}
