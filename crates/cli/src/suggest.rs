//! Unknown-flag hints that never turn a flag's meaning around.
//!
//! clap suggests the flag closest in spelling, so a mistyped `--publish-no`
//! gets `--publish`: the opposite of what was meant. A suggestion is
//! dropped when one of the typed and the suggested flag is negated
//! (`--no-x`, `--x-no`, `--not-x`) and the other is not; a negated flag of
//! the same command with the same other words is offered instead
//! (`--publish-no` gets `--no-publish`).

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Command, Error};

/// What a flag is about and whether it is negated: `--no-publish`,
/// `--nopublish`, `--publish-no` and `--not-publish` are all `publish`,
/// negated. Reading `--notify` as a negation too costs nothing: a
/// suggestion is only dropped when the two sides differ.
fn meaning(flag: &str) -> (String, bool) {
    let compact: String = flag.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect();
    for prefix in ["not", "no"] {
        if let Some(rest) = compact.strip_prefix(prefix) {
            return (rest.to_string(), true);
        }
    }
    for suffix in ["not", "no"] {
        if let Some(rest) = compact.strip_suffix(suffix) {
            return (rest.to_string(), true);
        }
    }
    (compact, false)
}

/// `--name` for the long name and every alias of `arg`.
fn names(arg: &clap::Arg) -> impl Iterator<Item = String> + '_ {
    arg.get_long().into_iter().chain(arg.get_all_aliases().unwrap_or_default()).map(|long| format!("--{long}"))
}

/// `error`, minus a suggestion that means the opposite of the typed flag.
pub fn without_opposites(mut error: Error, cli: &Command) -> Error {
    if error.kind() != ErrorKind::UnknownArgument {
        return error;
    }
    let (Some(ContextValue::String(typed)), Some(ContextValue::String(suggested))) =
        (error.get(ContextKind::InvalidArg), error.get(ContextKind::SuggestedArg))
    else {
        return error;
    };
    let typed = meaning(typed);
    if typed.1 == meaning(suggested).1 {
        return error;
    }
    let suggested = suggested.clone();
    // The argument suggested, and the command it belongs to.
    let commands: Vec<&Command> = std::iter::once(cli).chain(cli.get_subcommands()).collect();
    let owner = commands.into_iter().find_map(|cmd| {
        let arg = cmd.get_arguments().find(|arg| names(arg).any(|name| name == suggested))?;
        Some((cmd, arg))
    });
    let instead = owner.and_then(|(cmd, _)| {
        cmd.get_arguments().find_map(|arg| Some((arg, names(arg).find(|name| meaning(name) == typed)?)))
    });
    match &instead {
        Some((_, flag)) => {
            error.insert(ContextKind::SuggestedArg, ContextValue::String(flag.clone()));
        }
        None => {
            error.remove(ContextKind::SuggestedArg);
        }
    }
    // clap wrote the suggested argument into the usage line too.
    let long = |arg: &clap::Arg| arg.get_long().map(|long| format!(" --{long}"));
    if let (Some(wrong), Some(ContextValue::StyledStr(usage))) =
        (owner.and_then(|(_, arg)| long(arg)), error.get(ContextKind::Usage))
    {
        let right = instead.and_then(|(arg, _)| long(arg)).unwrap_or_default();
        let usage = usage.to_string().replacen(&wrong, &right, 1);
        error.insert(ContextKind::Usage, ContextValue::StyledStr(usage.into()));
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negations_are_found_wherever_they_stand() {
        let publish = |negated| ("publish".to_string(), negated);
        assert_eq!(meaning("--no-publish"), publish(true));
        assert_eq!(meaning("--nopublish"), publish(true));
        assert_eq!(meaning("--publish-no"), publish(true));
        assert_eq!(meaning("--not-publish"), publish(true));
        assert_eq!(meaning("--publish-not"), publish(true));
        assert_eq!(meaning("--publish"), publish(false));
        assert_eq!(meaning("--token-auth"), ("tokenauth".to_string(), false));
    }
}
