//! The `settings!` macro: from one entry per setting it writes the clap `Flags`, the toml
//! `File`, the layered lookups, the [`super::SETTINGS`] table and [`super::apply_reload`].
//! Must never: hold a setting itself (the entries live in `config/mod.rs`, beside the types
//! they use).

// Each setting is one entry of `settings!` (in `config/mod.rs`); the macro makes from it the clap flag (so
// `--help` and the completions), the `chatd.toml` key, the layered lookup with its default and
// check, the row of `SETTINGS` that tests/docs.rs holds the man pages to, and what SIGHUP does
// with it. Five hand-kept copies of each (flags, file, lookup, reload, docs) could disagree.
//
// Entry grammar (every clause is present, empty brackets mean "none"):
//
//   /// help line (`--help`, the table)
//   key: Type {
//       flag: [clap `arg` attributes after `long`],   (only in the `flags` group)
//       env: ["VAR", "VAR" / "file joined to it"],    (paths only; after the flag, before the file)
//       default: [] | [value] | [from computed_value],
//       check: [] | [fn(&'static str, T) -> Result<T, ConfigError>],
//       sighup: [restart(config.path)] | [unused] | [apply(rank label = config.path, ...)],
//   }
//
// `rank` is the change's place in the `reloaded config:` log line: that order predates the
// table and does not follow it, and log readers and tests know the line as it is.
macro_rules! settings {
    (
        $(#[doc = $flags_doc:tt])*
        flags {
            $(
                #[doc = $help:tt]
                $key:ident: $ty:ty {
                    flag: [$($arg:tt)*],
                    env: [$($var:literal $(/ $join:literal)?),*],
                    default: [$($default:tt)*],
                    check: [$($check:ident)?],
                    sighup: [$($sighup:tt)*],
                }
            )*
        }
        file_only {
            $(
                #[doc = $fhelp:tt]
                $fkey:ident: $fty:ty {
                    default: [$($fdefault:tt)*],
                    check: [$($fcheck:ident)?],
                    sighup: [$($fsighup:tt)*],
                }
            )*
        }
    ) => {
        $(#[doc = $flags_doc])*
        #[derive(Parser, Debug, Clone, Default)]
        #[command(name = "chatd", version, long_about = None)]
        pub struct Flags {
            /// Config file (default: $CONFIGURATION_DIRECTORY/chatd.toml, else
            /// $XDG_CONFIG_HOME/chatd/chatd.toml, else ~/.config/chatd/chatd.toml)
            #[arg(short = 'c', long = "config", value_name = "FILE")]
            pub config: Option<PathBuf>,
            $(
                #[doc = $help]
                #[arg(long, $($arg)*)]
                pub $key: Option<$ty>,
            )*
        }

        /// The config file: a key per setting, named as the setting (its flag has `-` for `_`).
        #[derive(Deserialize, Debug, Clone, Default, PartialEq)]
        #[serde(deny_unknown_fields)]
        pub struct File {
            $(
                #[doc = $help]
                pub $key: Option<$ty>,
            )*
            $(
                #[doc = $fhelp]
                pub $fkey: Option<$fty>,
            )*
        }

        /// Every setting, in the order of `--help` and of the file's keys.
        pub const SETTINGS: &[Setting] = &[
            $(
                Setting {
                    key: stringify!($key),
                    flag: true,
                    env: &[$($var),*],
                    help: $help,
                    default: settings!(@shown $ty; $($default)*),
                    sighup: settings!(@sighup $($sighup)*),
                },
            )*
            $(
                Setting {
                    key: stringify!($fkey),
                    flag: false,
                    env: &[],
                    help: $fhelp,
                    default: settings!(@shown $fty; $($fdefault)*),
                    sighup: settings!(@sighup $($fsighup)*),
                },
            )*
        ];

        impl Layers<'_> {
            $(
                fn $key(&self) -> Result<settings!(@out $ty; $($default)*), ConfigError> {
                    let raw: Option<$ty> = self.flags.$key.clone()
                        $(.or_else(|| env_path($var)$(.map(|d| d.join($join)))?))*
                        .or_else(|| self.file.$key.clone());
                    let checked = match raw {
                        Some(v) => Some(settings!(@check $key, v; $($check)?)),
                        None => None,
                    };
                    Ok(settings!(@default checked; $($default)*))
                }
            )*
            $(
                fn $fkey(&self) -> Result<settings!(@out $fty; $($fdefault)*), ConfigError> {
                    let raw: Option<$fty> = self.file.$fkey.clone();
                    let checked = match raw {
                        Some(v) => Some(settings!(@check $fkey, v; $($fcheck)?)),
                        None => None,
                    };
                    Ok(settings!(@default checked; $($fdefault)*))
                }
            )*
        }

        /// Apply to `running` what SIGHUP may change at once, and say what changed.
        ///
        /// Restart-only settings are compared, never applied; the caller sets the log level
        /// and hands the relay its new limits.
        pub fn apply_reload(running: &mut Config, new: &Config) -> Reload {
            let mut ranked: Vec<(u8, String)> = Vec::new();
            let mut restart_needed = false;
            let log_level = running.log_level != new.log_level;
            $(settings!(@apply running, new, ranked, restart_needed; $($sighup)*);)*
            $(settings!(@apply running, new, ranked, restart_needed; $($fsighup)*);)*
            ranked.sort_by_key(|(rank, _)| *rank);
            Reload {
                changes: ranked.into_iter().map(|(_, change)| change).collect(),
                restart_needed,
                log_level,
            }
        }
    };

    (@check $key:ident, $v:ident;) => { $v };
    (@check $key:ident, $v:ident; $check:ident) => { $check(stringify!($key), $v)? };

    // The lookup's result: a value when there is a default, else whether one was given.
    (@out $ty:ty;) => { Option<$ty> };
    (@out $ty:ty; $($default:tt)+) => { $ty };
    (@default $v:ident;) => { $v };
    (@default $v:ident; from $default:expr) => { match $v { Some(v) => v, None => $default } };
    (@default $v:ident; $default:expr) => { $v.unwrap_or_else(|| $default) };

    // The default as the documentation states it; computed ones are described in prose.
    (@shown $ty:ty;) => { None };
    (@shown $ty:ty; from $default:expr) => { None };
    (@shown $ty:ty; $default:expr) => {
        Some(|| {
            let v: $ty = $default;
            v.to_string()
        })
    };

    (@sighup restart($($path:ident).+)) => { Sighup::Restart };
    (@sighup unused) => { Sighup::Unused };
    (@sighup apply($($rest:tt)*)) => { Sighup::Apply };

    (@apply $run:ident, $new:ident, $ranked:ident, $restart:ident; restart($($path:ident).+)) => {
        $restart |= $new.$($path).+ != $run.$($path).+
    };
    (@apply $run:ident, $new:ident, $ranked:ident, $restart:ident; unused) => {};
    (@apply $run:ident, $new:ident, $ranked:ident, $restart:ident;
        apply($($rank:literal $label:ident = $($path:ident).+),+)) => {
        $(
            if $new.$($path).+ != $run.$($path).+ {
                $ranked.push((
                    $rank,
                    format!(
                        "{} {:?} -> {:?}",
                        stringify!($label),
                        $run.$($path).+,
                        $new.$($path).+
                    ),
                ));
                $run.$($path).+ = $new.$($path).+.clone();
            }
        )+
    };
}
