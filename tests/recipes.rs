//! Bad input gets a clear error and a non-zero exit, never a panic or a
//! partial output file; every example recipe validates.

use kiln_tests::kiln as k;
use std::path::PathBuf;
use std::process::Command;

fn kiln() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

#[test]
fn example_recipes_validate() {
    let dir = k::workspace().join("recipes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let r = k::run(Command::new(kiln()).arg("validate").arg(&p));
            assert!(r.ok, "{}: {}", p.display(), r.stderr);
            n += 1;
        }
    }
    assert!(n >= 1, "no recipes found in {}", dir.display());
}

#[test]
fn recipe_errors_name_file_line_and_field() {
    let dir = k::scratch("bad-recipes");
    let cases = [
        (
            "unknown-key.toml",
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\ncmdlin = \"x\"\n",
            ":5:1: kernel.cmdlin: unknown field",
        ),
        (
            "two-kernels.toml",
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"a\"\npath = \"vmlinuz\"\n",
            ":5:8: kernel.path: [kernel] takes exactly one of",
        ),
        (
            "bad-net.toml",
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"a\"\n\n[[service]]\nname = \"s\"\nimage = \"r/i:1\"\nnet = \"bridge\"\n",
            ":9:7: service[0].net: expected \"host\" or \"none\"",
        ),
        (
            "wrong-type.toml",
            "name = \"x\"\nversion = \"1\"\n[kernel]\ndebian = \"a\"\n[disk]\nsize = 5\n",
            ":6:8: disk.size: invalid type",
        ),
    ];
    for (file, text, want) in cases {
        let p = dir.join(file);
        std::fs::write(&p, text).unwrap();
        for verb in ["validate", "build"] {
            let out = dir.join("out");
            let r = k::run(Command::new(kiln()).arg(verb).arg(&p).arg("--quiet"));
            assert!(!r.ok, "{verb} {file} succeeded");
            assert_eq!(r.code, Some(1), "{verb} {file}: {}", r.stderr);
            assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
            let expected = format!("{}{want}", p.display());
            assert!(
                r.stderr.contains(&expected),
                "{verb} {file}: wanted {expected:?} in:\n{}",
                r.stderr
            );
            assert!(!out.exists());
        }
    }
}

#[test]
fn missing_recipe_is_a_clear_error() {
    let r = k::run(Command::new(kiln()).args(["validate", "/nonexistent/recipe.toml"]));
    assert!(!r.ok);
    assert!(
        r.stderr.contains("/nonexistent/recipe.toml"),
        "{}",
        r.stderr
    );
}

/// A build that fails midway (an image that cannot be found) leaves no file
/// at the output path.
#[test]
fn failed_build_leaves_no_output() {
    let dir = k::scratch("failed-build");
    let recipe = dir.join("r.toml");
    std::fs::write(
        &recipe,
        "name = \"broken\"\nversion = \"1\"\n[kernel]\ndebian = \"linux-image-cloud-amd64\"\n\n[[service]]\nname = \"s\"\nimage = \"oci-layout:does-not-exist\"\n",
    )
    .unwrap();
    let out = dir.join("out");
    let r = k::try_build(&kiln(), &recipe, &out);
    assert!(!r.ok);
    assert!(r.stderr.contains("does-not-exist"), "{}", r.stderr);
    assert!(!out.join("broken.raw").exists());
    if out.exists() {
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            0,
            "partial files left"
        );
    }
}

/// A Debian package that does not exist is reported against the recipe
/// field that asked for it.
#[test]
fn unknown_debian_package_names_the_field() {
    let dir = k::scratch("unknown-package");
    let recipe = dir.join("r.toml");
    std::fs::write(
        &recipe,
        "name = \"nopkg\"\nversion = \"1\"\n[kernel]\ndebian = \"no-such-kernel-package\"\n",
    )
    .unwrap();
    let out = dir.join("out");
    let r = k::try_build(&kiln(), &recipe, &out);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let want = format!(
        "{}: kernel.debian: cannot satisfy `no-such-kernel-package`",
        recipe.display()
    );
    assert!(
        r.stderr.contains(&want),
        "wanted {want:?} in:\n{}",
        r.stderr
    );
    assert!(!out.join("nopkg.raw").exists());
}
