//! `subrosa-server`: the delivery service binary.

fn main() -> std::process::ExitCode {
    subrosa_server::cli::main("subrosa-server", None, |_| {})
}
