//! `subrosa-attack-server`: TEST ONLY. `subrosa-server` with the
//! malicious-operator controller installed: it follows the plan in
//! `<data-dir>/attacks.json` (re-read on every request; see README.md).
//! Never run it for real users.

const ABOUT: &str =
    "TEST ONLY: a Subrosa server run by a malicious operator (plan in DATA/attacks.json), for tests that clients detect it";

fn main() -> std::process::ExitCode {
    subrosa_server::cli::main("subrosa-attack-server", Some(ABOUT), |config| {
        tracing::warn!("TEST ONLY: this server follows the attack plan in its data directory");
        config.attacks = Some(subrosa_server::attacks::Attacks::new(&config.data_dir));
    })
}
