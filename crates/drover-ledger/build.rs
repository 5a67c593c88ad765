//! `sqlx::migrate!` embeds `migrations/` at compile time, but on stable Rust cargo does not
//! know the macro read that directory: without this, a new migration file leaves a binary
//! that silently lacks it (what `cargo sqlx migrate build-script` generates).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
