//! Crash drill for the rootfs tests: prepare a box's Disk rootfs and die (abort, as a kill
//! would) when the prepare reaches `STEP`.
//!
//! `rootfs_drill HOME IMAGE AGENT STEP`: exits 0 when the step was never reached.

use std::sync::Arc;

use boxlet::rootfs::{AgentBinary, DiskStrategy, Home, PrepareHook, PrepareRequest, PrepareStep};
use boxlet::RootfsStrategy;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, home, image, agent, step] = args.as_slice() else {
        eprintln!("usage: rootfs_drill HOME IMAGE AGENT STEP");
        std::process::exit(2);
    };
    let step = PrepareStep::from_name(step).unwrap_or_else(|| panic!("unknown step {step}"));
    let home = Home::new(home);
    let store = Arc::new(boxlet_cas::Store::open(home.root()).expect("open the store"));
    let hook = PrepareHook::new(move |s| {
        if s == step {
            std::process::abort();
        }
        true
    });
    let agent = AgentBinary {
        path: agent.into(),
        build_hash: None,
    };
    let disk = DiskStrategy::with_hook(home, store, agent, hook).expect("the strategy");
    let req = PrepareRequest {
        image: Some(image.clone()),
        box_id: boxlet_cas::BoxId::mint(),
    };
    disk.prepare(&req).await.expect("prepare");
}
