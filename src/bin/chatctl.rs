//! chatctl: the user-facing command. All logic lives in `chatd::cli`.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(chatd::cli::run(std::env::args_os().collect()))
}
