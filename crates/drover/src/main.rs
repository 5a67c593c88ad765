//! The `drover` binary: the CLI with the built-in pipelines (`noop`, `payroll`, `sql`,
//! `exec`). A team's own binary is the same line with its own registry (see the `drover`
//! library's docs and `examples/invoicing`).

fn main() -> std::process::ExitCode {
    drover::main(drover::Registry::builtin())
}
