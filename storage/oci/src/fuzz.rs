//! Entry points for the cargo-fuzz target in `fuzz/` and its replay in tests: what a
//! hostile registry or image sends, parsed as boxlet parses it.

use std::io::Read;

use crate::manifest::{
    check_bounds, choose_platform, config_platform, digest_of, manifest_blobs, parse_config,
    parse_document, platform_of, Compression, Document,
};

/// How far one input got, so replays can tell the seeds reach the parsers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reached {
    /// Parsed as an index.
    pub index: bool,
    /// Parsed as a manifest within the bounds, its blobs listed.
    pub manifest: bool,
    /// Parsed as an image configuration.
    pub config: bool,
    /// Bytes a layer decompressor gave (at most 4 MiB are read).
    pub decompressed: u64,
}

/// The bytes as a manifest or index (every check boxlet makes before fetching), as an
/// image configuration, as a reference, and as a compressed layer read a little way.
pub fn documents(data: &[u8]) -> Reached {
    let mut r = Reached::default();
    match parse_document(data, "fuzz") {
        Ok(Document::Index(index)) => {
            r.index = true;
            for d in index.manifests() {
                let _ = platform_of(d);
                let _ = digest_of(d, "fuzz");
            }
            let _ = choose_platform(&index, "fuzz");
        }
        Ok(Document::Manifest(m)) => {
            if check_bounds(&m, "fuzz").is_ok() {
                r.manifest = manifest_blobs(&m, "fuzz").is_ok();
            }
        }
        Err(_) => {}
    }
    if let Ok(c) = parse_config(data, "fuzz") {
        let _ = config_platform(&c);
        r.config = true;
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::manifest::normalize_reference(text);
    }
    let kind = Compression::detect("", data);
    if kind != Compression::None {
        if let Ok(reader) = kind.reader(data) {
            let mut sink = [0u8; 64 << 10];
            let mut limited = reader.take(4 << 20);
            while let Ok(n) = limited.read(&mut sink) {
                if n == 0 {
                    break;
                }
                r.decompressed += n as u64;
            }
        }
    }
    r
}

/// Inputs worth starting from (the corpus seeds), in this order: an OCI manifest, an
/// index of two platforms, an image configuration, a manifest of more layers than
/// allowed, a gzip and a zstd stream of zeros (bombs in miniature).
pub fn documents_seeds() -> Vec<Vec<u8>> {
    let digest = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let layer = |c: char| {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":1000}}"#,
            digest(c)
        )
    };
    let manifest = |layers: &[String]| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":500}},"layers":[{}]}}"#,
            crate::manifest::OCI_MANIFEST,
            digest('c'),
            layers.join(",")
        )
    };
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{m}","digest":"{}","size":400,"platform":{{"os":"linux","architecture":"amd64"}}}},{{"mediaType":"{m}","digest":"{}","size":400,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#,
        crate::manifest::OCI_INDEX,
        digest('a'),
        digest('b'),
        m = crate::manifest::OCI_MANIFEST,
    );
    let config = r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let many: Vec<String> = (0..=crate::manifest::MAX_LAYERS)
        .map(|_| layer('e'))
        .collect();
    let zeros = vec![0u8; 1 << 20];
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &zeros).expect("writing to memory");
    let gz = gz.finish().expect("writing to memory");
    let zst =
        ruzstd::encoding::compress_to_vec(&zeros[..], ruzstd::encoding::CompressionLevel::Fastest);
    vec![
        manifest(&[layer('d'), layer('f')]).into_bytes(),
        index.into_bytes(),
        config.as_bytes().to_vec(),
        manifest(&many).into_bytes(),
        gz,
        zst,
    ]
}
