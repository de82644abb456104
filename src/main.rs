//! The `banmesh` binary: everything lives in the library; see `banmesh::cli`.
fn main() -> std::process::ExitCode {
    banmesh::cli::main()
}
