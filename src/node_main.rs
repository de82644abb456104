//! `banmesh-node`: `banmesh node` as a binary of its own (issue 19).
//!
//! Same flags, config file, `BANMESH_*` variables, `SIGHUP` reload and
//! code as `banmesh node` ([`banmesh::cli::node_main`]), but the linker
//! keeps only what the node reaches: no hub, MySQL, SQLite, bench or admin
//! code to map, so fewer pages of code stay resident in a long-running
//! node (docs/perf/node-memory.txt).
fn main() -> std::process::ExitCode {
    banmesh::cli::node_main()
}
