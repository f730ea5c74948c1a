//! `vmcp-agent`: `/init` of the vmcp guest. See the library docs for what it does.

fn main() -> std::process::ExitCode {
    vmcp_guest_agent::main()
}
