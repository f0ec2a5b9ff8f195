//! Gives libreshard.so the soname `libreshard.so`, so programs linked against it record that name
//! (found through their rpath or the loader path) rather than the absolute build path.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libreshard.so");
    }
}
