// `sqlx::migrate!` embeds ./migrations at compile time, and cargo does not know a
// new file there changes the build: without this, a new migration is silently left
// out of an incremental build.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
