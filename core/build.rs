//! Build script: makes cargo rebuild when the embedded Python SDK changes.
//!
//! `include_dir!` (in `worker/python.rs`) embeds `python/unimodel`, but on stable Rust it
//! cannot tell cargo which files it read, so without this an SDK edit would not reach the
//! binary until something else forced a rebuild.

fn main() {
    println!("cargo:rerun-if-changed=../python/unimodel");
    println!("cargo:rerun-if-changed=build.rs");
}
