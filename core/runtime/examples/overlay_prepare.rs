//! Prepare one box with the OverlayMount strategy and print the strategy that made it (for
//! the tests that run this without CAP_SYS_ADMIN).
//!
//! `overlay_prepare HOME IMAGE fallback|fallback-quota|strict` (`fallback` asks for no
//! disk quota, which without CAP_SYS_ADMIN is the only way a box is made).

use std::sync::Arc;

use boxlet::rootfs::{Home, OverlayStrategy, PrepareRequest};
use boxlet::RootfsStrategy;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, home, image, mode] = args.as_slice() else {
        eprintln!("usage: overlay_prepare HOME IMAGE fallback|fallback-quota|strict");
        std::process::exit(2);
    };
    let home = Home::new(home);
    let store = Arc::new(boxlet_cas::Store::open(home.root()).expect("open the store"));
    let mut overlay =
        OverlayStrategy::new(home, store, mode.starts_with("fallback")).expect("the strategy");
    if mode == "fallback" {
        overlay = overlay.with_disk_quota(boxlet::rootfs::DiskQuota::Unlimited);
    }
    let req = PrepareRequest {
        image: Some(image.clone()),
        box_id: boxlet_cas::BoxId::mint(),
    };
    match overlay.prepare(&req).await {
        Ok(r) => {
            let kind = serde_json::to_value(&r.strategy).expect("json")["kind"].clone();
            println!("{}", kind.as_str().unwrap_or("?"));
            overlay.cleanup(&r).await.expect("cleanup");
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
