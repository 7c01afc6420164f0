//! The zero-copy kernel image (host only, no KVM): the mapped guest RAM holds exactly what
//! copying the kernel in would, a guest's writes never reach the cached image, and a
//! rebuilt kernel gets an image of its own.

use boxlet_kvm::kernel_image;
use boxlet_testkit as kit;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const LOAD_FROM: u64 = 0x10_0000;
const RAM: u64 = 256 << 20;

#[test]
fn the_mapped_image_is_the_copied_kernel_and_guest_writes_stay_private() {
    // The kernel first: finding it reads the cache directory the test then moves.
    let kernel = kit::kernel();
    let cache = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // The only test in this binary that touches the environment: both places an image
    // may be kept are fresh.
    std::env::set_var("XDG_CACHE_HOME", cache.path());
    std::env::set_var("TMPDIR", tmp.path());

    // The reference: the kernel copied into plain memory.
    let copied: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let mut f = std::fs::File::open(&kernel).unwrap();
    let loaded = Elf::load(&copied, None, &mut f, Some(GuestAddress(LOAD_FROM))).unwrap();
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        panic!("the test kernel has a PVH note");
    };

    let image = kernel_image::cached(&kernel, LOAD_FROM).unwrap();
    assert_eq!(image.entry, entry.0);
    assert_eq!(image.kernel_end, loaded.kernel_end);
    let mapped = kernel_image::guest_memory(&image, RAM).unwrap();
    let mut a = vec![0u8; loaded.kernel_end as usize];
    let mut b = vec![0u8; loaded.kernel_end as usize];
    copied.read_slice(&mut a, GuestAddress(0)).unwrap();
    mapped.read_slice(&mut b, GuestAddress(0)).unwrap();
    assert!(a == b, "the mapped kernel differs from the copied one");
    // RAM above the image is there and zeroed.
    let mut top = [1u8; 4096];
    mapped
        .read_slice(&mut top, GuestAddress(RAM - 4096))
        .unwrap();
    assert_eq!(top, [0u8; 4096]);

    // A guest overwriting its kernel changes its own pages only.
    let at = GuestAddress(entry.0);
    mapped.write_slice(&[0xcc; 64], at).unwrap();
    let again = kernel_image::cached(&kernel, LOAD_FROM).unwrap();
    assert_eq!(again.len, image.len, "the cached image was reused");
    let fresh = kernel_image::guest_memory(&again, RAM).unwrap();
    let mut code = [0u8; 64];
    fresh.read_slice(&mut code, at).unwrap();
    assert_eq!(&code[..], &a[entry.0 as usize..entry.0 as usize + 64]);

    // A rebuilt kernel (another file, same bytes, later mtime) gets its own image.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("vmlinux");
    std::fs::copy(&kernel, &other).unwrap();
    let before = std::fs::read_dir(cache.path().join("boxlet/kernel-images"))
        .unwrap()
        .count();
    kernel_image::cached(&other, LOAD_FROM).unwrap();
    let after = std::fs::read_dir(cache.path().join("boxlet/kernel-images"))
        .unwrap()
        .count();
    assert_eq!(after, before + 2, "a new image and its info file");

    // A cache directory that cannot be made (a read-only home): a private directory under
    // the temporary one takes the image.
    let blocked = dir.path().join("not-a-directory");
    std::fs::write(&blocked, b"").unwrap();
    std::env::set_var("XDG_CACHE_HOME", &blocked);
    let third = dir.path().join("vmlinux-3");
    std::fs::copy(&kernel, &third).unwrap();
    let image = kernel_image::cached(&third, LOAD_FROM).unwrap();
    assert_eq!(image.entry, entry.0);
    let private = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("kernel-images"))
        .expect("a private image directory in TMPDIR");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&private).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o077,
        0,
        "{}: only its owner may write there",
        private.display()
    );
    // A cache directory others may write (or another user's, as sudo keeps HOME) is not
    // trusted with guest code: the private temporary directory takes the image.
    let shared = dir.path().join("shared-cache");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::env::set_var("XDG_CACHE_HOME", &shared);
    let fourth = dir.path().join("vmlinux-4");
    std::fs::copy(&kernel, &fourth).unwrap();
    let image4 = kernel_image::cached(&fourth, LOAD_FROM).unwrap();
    assert!(
        !shared.join("boxlet").exists(),
        "nothing built where others may write"
    );
    // A jailed VMM is told its image outright, and takes it over any cache.
    let elsewhere = tempfile::tempdir().unwrap();
    std::env::set_var("TMPDIR", elsewhere.path());
    std::env::set_var("BOXLET_VMM_KERNEL_IMAGE", &image4.paths[0]);
    let given = kernel_image::cached(&fourth, LOAD_FROM).unwrap();
    assert_eq!(given.paths[0], image4.paths[0]);
    std::env::remove_var("BOXLET_VMM_KERNEL_IMAGE");
    std::env::set_var("TMPDIR", tmp.path());
    std::env::set_var("XDG_CACHE_HOME", cache.path());

    // Not a kernel: an error naming what is wrong, and nothing cached.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not an elf").unwrap();
    let e = kernel_image::cached(&junk, LOAD_FROM).unwrap_err();
    assert!(e.contains("ELF"), "{e}");
    let last = std::fs::read_dir(cache.path().join("boxlet/kernel-images"))
        .unwrap()
        .count();
    assert_eq!(last, after, "no partial image left behind");
}
