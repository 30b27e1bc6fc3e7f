//! A shared remote cache on S3-compatible storage (AWS S3, MinIO, R2, moto, ...), through the
//! `object_store` crate DataFusion already uses.
//!
//! ```text
//! <prefix>/v1/objects/<output>/<path>   the files of one output tree, named by content
//! <prefix>/v1/outputs/<output>          the key whose result this tree is (for lookups by digest)
//! <prefix>/v1/manifests/<key>.json      an envelope around the manifest: written last, once
//! ```
//!
//! Publishing uploads the files first and the manifest last with a conditional put
//! (`If-None-Match: *`), so a reader never sees a manifest before its files, and of two writers
//! of one key exactly one manifest stays. A pull reads the envelope, checks the writer against
//! the trusted list (and its MAC when a secret is configured), checks the manifest like a local
//! one (its file list hashes to the output digest), downloads every file into a staging
//! directory while hashing it, and only then moves the tree into the local store and writes
//! the local manifest: a corrupt or truncated remote file is a miss with a warning, never a hit.
//!
//! Trust: a cached result is the output of running code, as in Bazel's remote cache. Whoever
//! can write the bucket can make every reader use any bytes they like for a key. So reads are
//! limited to writers named in `trusted_writers` (this machine's own writer name is always
//! trusted), and when `NEWT_CACHE_SECRET` is set every manifest carries a keyed blake3 MAC over
//! its writer and bytes: a reader with the secret rejects manifests without a valid MAC, so
//! write access to the bucket alone is not enough to plant a result. Without a secret, writer
//! names are labels, not proof; rely on the bucket's access policy.

use std::path::{Component, Path as FsPath};
use std::sync::Arc;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion, WriteMultipart};
use serde::{Deserialize, Serialize};

use crate::error::io_err;
use crate::fsutil::write_atomic;
use crate::store::parse_manifest;
use crate::{Cache, CacheError, Digest, FileEntry, Manifest};

/// Version of the remote layout and envelope.
pub const REMOTE_FORMAT: u32 = 1;
/// A result with this file at its top names files of the machine that made it (a model's
/// weights kept in place, `newt_model::weights_ref`): [`Remote::push`] never uploads it.
pub const LOCAL_REFS_FILE: &str = "local_refs.json";
const MAC_CONTEXT: &str = "newt 2026 remote cache manifest mac v1";
/// Files larger than this are uploaded in parts.
const MULTIPART_ABOVE: u64 = 32 << 20;
const PART_SIZE: usize = 16 << 20;
/// An envelope larger than this is not a manifest newt wrote.
const MAX_ENVELOPE: usize = 64 << 20;

/// Whether this machine may upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteMode {
    /// Look up and download only (the default).
    Read,
    /// Also upload every result this machine publishes.
    ReadWrite,
}

/// Where the remote cache is and how this machine uses it.
#[derive(Debug, Clone)]
pub struct RemoteSpec {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// Endpoint URL of an S3-compatible server; `None` is AWS (or `AWS_ENDPOINT`).
    pub endpoint: Option<String>,
    /// Region; `None` is `AWS_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// Read, or read and write.
    pub mode: RemoteMode,
    /// The name this machine writes results under.
    pub writer: String,
    /// Writers whose results this machine uses (`*`: any). Its own name is always trusted.
    pub trusted_writers: Vec<String>,
    /// The shared secret that MACs manifests (`NEWT_CACHE_SECRET`).
    pub secret: Option<String>,
}

/// What can go wrong talking to the remote cache.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The configuration cannot work.
    #[error("remote cache {url}: {message}")]
    Config {
        /// The remote's URL.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The store answered with an error.
    #[error("remote cache {url}: could not {action} {path}: {}", brief(cause))]
    Store {
        /// The remote's URL.
        url: String,
        /// What was attempted.
        action: &'static str,
        /// The object's path in the bucket.
        path: String,
        /// The store's error (shown in one line, so not a `source`: S3's XML body stays out).
        cause: object_store::Error,
    },
    /// Uploading needs `mode: read-write`.
    #[error("remote cache {url} is read-only here (mode: read); set `cache: {{mode: read-write}}` to upload")]
    ReadOnly {
        /// The remote's URL.
        url: String,
    },
    /// A local cache operation failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// The answer of [`Remote::pull`].
#[derive(Debug, Clone, PartialEq)]
pub enum Pulled {
    /// Downloaded, verified and now in the local cache.
    Hit(Manifest),
    /// The remote has no result for the key.
    Miss,
    /// The remote has one, but it was not used; the message says why (untrusted writer, bad
    /// MAC, corrupt manifest, a file that does not match its digest, ...).
    Rejected(String),
}

/// The answer of [`Remote::push`].
#[derive(Debug, Clone, PartialEq)]
pub enum Pushed {
    /// The result names files of this machine ([`LOCAL_REFS_FILE`]: a model's weights kept
    /// where they are): it is not shared, and another machine runs the stage itself.
    LocalOnly,
    /// This machine's result is now the remote's.
    Uploaded {
        /// Files uploaded (files already there with the right size are skipped).
        files: usize,
        /// Bytes uploaded.
        bytes: u64,
    },
    /// The remote already had this very result.
    AlreadyThere,
    /// Another writer's result for the key came first; it stays (results of one key are
    /// interchangeable), ours is not published.
    KeptOther {
        /// The output digest of the result that stays.
        output: Digest,
    },
}

/// The manifest as stored remotely: its exact bytes, who wrote it, and their MAC.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: u32,
    writer: String,
    mac: Option<String>,
    manifest: String,
}

/// One result in a remote cache, as `newt cache ls --remote` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemoteEntry {
    /// Its key.
    pub key: Digest,
    /// Its manifest, when this machine would use the result.
    pub manifest: Option<Manifest>,
    /// Who wrote it, when its envelope says.
    pub writer: Option<String>,
    /// Why this machine would not use it.
    pub problem: Option<String>,
}

/// A handle on a remote cache. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    url: String,
    mode: RemoteMode,
    writer: String,
    trusted: Vec<String>,
    mac_key: Option<[u8; 32]>,
}

impl Remote {
    /// Opens an S3 remote. Credentials come from the usual `AWS_*` environment variables.
    pub fn open(spec: &RemoteSpec) -> Result<Remote, RemoteError> {
        let config = |message: String| RemoteError::Config { url: spec.url.clone(), message };
        let rest = spec
            .url
            .strip_prefix("s3://")
            .ok_or_else(|| config("only s3:// URLs are supported (s3://bucket/prefix)".into()))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(config("the URL names no bucket (s3://bucket/prefix)".into()));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = &spec.endpoint {
            builder = builder.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = &spec.region {
            builder = builder.with_region(region);
        }
        let store = builder.build().map_err(|e| config(e.to_string()))?;
        Self::with_store(Arc::new(store), prefix, spec)
    }

    /// A remote on any object store (tests use `object_store::memory::InMemory`).
    pub fn with_store(store: Arc<dyn ObjectStore>, prefix: &str, spec: &RemoteSpec) -> Result<Remote, RemoteError> {
        let prefix = prefix.trim_matches('/');
        let prefix = ObjPath::parse(prefix)
            .map_err(|e| RemoteError::Config { url: spec.url.clone(), message: format!("prefix `{prefix}`: {e}") })?;
        if spec.writer.is_empty() {
            return Err(RemoteError::Config { url: spec.url.clone(), message: "the writer name is empty".into() });
        }
        let mac_key =
            spec.secret.as_deref().filter(|s| !s.is_empty()).map(|s| blake3::derive_key(MAC_CONTEXT, s.as_bytes()));
        Ok(Remote {
            store,
            prefix,
            url: spec.url.clone(),
            mode: spec.mode,
            writer: spec.writer.clone(),
            trusted: spec.trusted_writers.clone(),
            mac_key,
        })
    }

    /// The remote's URL, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Read-only or read-write.
    pub fn mode(&self) -> RemoteMode {
        self.mode
    }

    /// Whether results written by `writer` are used here.
    pub fn trusts(&self, writer: &str) -> bool {
        writer == self.writer || self.trusted.iter().any(|t| t == "*" || t == writer)
    }

    fn loc(&self, rel: &str) -> ObjPath {
        let mut p = self.prefix.clone();
        for part in format!("v{REMOTE_FORMAT}/{rel}").split('/') {
            p = p.clone().join(part);
        }
        p
    }
    fn manifest_loc(&self, key: &Digest) -> ObjPath {
        self.loc(&format!("manifests/{key}.json"))
    }
    fn object_loc(&self, output: &Digest, path: &str) -> ObjPath {
        self.loc(&format!("objects/{output}/{path}"))
    }
    fn output_loc(&self, output: &Digest) -> ObjPath {
        self.loc(&format!("outputs/{output}"))
    }

    fn store_err(&self, action: &'static str, path: &ObjPath) -> impl FnOnce(object_store::Error) -> RemoteError {
        let (url, path) = (self.url.clone(), path.to_string());
        move |cause| RemoteError::Store { url, action, path, cause }
    }

    fn mac(&self, key: &[u8; 32], writer: &str, manifest: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(key);
        for part in [writer.as_bytes(), manifest.as_bytes()] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().to_hex().to_string()
    }

    /// The remote envelope of `key`: `None` when there is none.
    async fn envelope(&self, key: &Digest) -> Result<Option<(Vec<u8>, Option<UpdateVersion>)>, RemoteError> {
        let loc = self.manifest_loc(key);
        match self.store.get(&loc).await {
            Ok(r) => {
                let version = UpdateVersion { e_tag: r.meta.e_tag.clone(), version: r.meta.version.clone() };
                if r.meta.size > MAX_ENVELOPE as u64 {
                    return Ok(Some((Vec::new(), Some(version))));
                }
                let bytes = r.bytes().await.map_err(self.store_err("read", &loc))?;
                Ok(Some((bytes.to_vec(), Some(version))))
            }
            // A missing bucket answers 404 too: that is a broken configuration, not a miss.
            Err(e @ object_store::Error::NotFound { .. }) if !e.to_string().contains("NoSuchBucket") => Ok(None),
            Err(e) => Err(self.store_err("read", &loc)(e)),
        }
    }

    /// The manifest inside envelope bytes, checked: format, trust, MAC, the manifest itself,
    /// and the safety of every file path. `Err` is the reason it is not used.
    fn open_envelope(&self, key: &Digest, bytes: &[u8]) -> Result<(Manifest, String), String> {
        if bytes.is_empty() || bytes.len() > MAX_ENVELOPE {
            return Err("its manifest is empty or too large".into());
        }
        let env: Envelope = serde_json::from_slice(bytes).map_err(|e| format!("its manifest is not valid ({e})"))?;
        if env.format != REMOTE_FORMAT {
            return Err(format!("its format {} is not the format {REMOTE_FORMAT} this newt reads", env.format));
        }
        if !self.trusts(&env.writer) {
            return Err(format!(
                "it was written by `{}`, who is not in trusted_writers (this machine writes as `{}`)",
                env.writer, self.writer
            ));
        }
        if let Some(mac_key) = &self.mac_key {
            let want = self.mac(mac_key, &env.writer, &env.manifest);
            match &env.mac {
                Some(mac) if constant_time_eq(mac.as_bytes(), want.as_bytes()) => {}
                Some(_) => {
                    return Err(format!("its MAC does not verify with NEWT_CACHE_SECRET (writer `{}`)", env.writer));
                }
                None => {
                    return Err(format!("it carries no MAC and NEWT_CACHE_SECRET is set (writer `{}`)", env.writer));
                }
            }
        }
        let manifest = parse_manifest(key, env.manifest.as_bytes())?;
        for f in &manifest.files {
            if !safe_relative(&f.path) {
                return Err(format!("its file list names an unsafe path `{}`", f.path));
            }
        }
        Ok((manifest, env.manifest))
    }

    /// Looks `key` up remotely and, on a usable result, downloads it into `cache` (verifying
    /// every byte against the manifest before anything is visible locally). Call it while
    /// holding the key's lock, after a local miss.
    pub async fn pull(&self, cache: &Cache, key: &Digest) -> Result<Pulled, RemoteError> {
        let Some((bytes, _)) = self.envelope(key).await? else { return Ok(Pulled::Miss) };
        let (manifest, manifest_json) = match self.open_envelope(key, &bytes) {
            Ok(m) => m,
            Err(why) => return Ok(Pulled::Rejected(why)),
        };
        let staging = cache.staging(key)?;
        for file in &manifest.files {
            let dest = staging.out_dir().join(&file.path);
            if let Err(why) = self.download_verified(&manifest.output, file, &dest).await? {
                return Ok(Pulled::Rejected(why));
            }
        }
        cache.import(staging, &manifest, manifest_json.as_bytes())?;
        Ok(Pulled::Hit(manifest))
    }

    /// Downloads one file, hashing it on the way. `Ok(Err(why))`: the bytes are not the ones
    /// the manifest names.
    async fn download_verified(
        &self,
        output: &Digest,
        file: &FileEntry,
        dest: &FsPath,
    ) -> Result<Result<(), String>, RemoteError> {
        use std::io::Write;
        let loc = self.object_loc(output, &file.path);
        let parent = dest.parent().expect("inside staging");
        std::fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        let result = match self.store.get(&loc).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Ok(Err(format!("its file `{}` is missing", file.path)));
            }
            Err(e) => return Err(self.store_err("download", &loc)(e)),
        };
        let mut out =
            std::fs::OpenOptions::new().write(true).create_new(true).open(dest).map_err(io_err("create", dest))?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(self.store_err("download", &loc))?;
            size += chunk.len() as u64;
            if size > file.size {
                return Ok(Err(format!(
                    "its file `{}` is larger than the {} bytes its manifest says",
                    file.path, file.size
                )));
            }
            hasher.update(&chunk);
            out.write_all(&chunk).map_err(io_err("write", dest))?;
        }
        if size != file.size {
            return Ok(Err(format!(
                "its file `{}` has {size} bytes, not the {} its manifest says",
                file.path, file.size
            )));
        }
        if Digest::from(hasher.finalize()) != file.digest {
            return Ok(Err(format!("its file `{}` does not match its digest", file.path)));
        }
        Ok(Ok(()))
    }

    /// Uploads the local result of `key`: files first (skipping those already there with the
    /// right size, unless `force`: after a pull found the remote's copy damaged), then the
    /// manifest, conditionally. A remote manifest that does not verify (corrupt, bad MAC) is
    /// replaced, conditionally on its version; a valid one from another writer stays.
    pub async fn push(&self, cache: &Cache, key: &Digest, force: bool) -> Result<Pushed, RemoteError> {
        if self.mode != RemoteMode::ReadWrite {
            return Err(RemoteError::ReadOnly { url: self.url.clone() });
        }
        // The manifest's exact bytes, checked without reading the object: every file is hashed
        // while it uploads, so a full lookup here would read a just-published result twice.
        let no_result = || RemoteError::Config {
            url: self.url.clone(),
            message: format!("no valid local result for key {} to upload", key.short()),
        };
        let manifest_json = std::fs::read(cache.manifest_path(key))
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(no_result)?;
        let manifest = parse_manifest(key, manifest_json.as_bytes()).map_err(|_| no_result())?;
        if manifest.files.iter().any(|f| f.path == LOCAL_REFS_FILE) {
            return Ok(Pushed::LocalOnly);
        }
        let existing = self.envelope(key).await?;
        let existing_ok = existing.as_ref().and_then(|(b, _)| self.open_envelope(key, b).ok());
        if let Some((other, _)) = &existing_ok
            && !force
        {
            return Ok(if other.output == manifest.output {
                Pushed::AlreadyThere
            } else {
                Pushed::KeptOther { output: other.output }
            });
        }
        let object = cache.object_path(&manifest.output);
        let (mut files, mut bytes) = (0usize, 0u64);
        for f in &manifest.files {
            let loc = self.object_loc(&manifest.output, &f.path);
            if !force && self.store.head(&loc).await.is_ok_and(|m| m.size == f.size) {
                continue;
            }
            self.upload_file(&object.join(&f.path), f, &loc).await?;
            files += 1;
            bytes += f.size;
        }
        let out_loc = self.output_loc(&manifest.output);
        self.store
            .put(&out_loc, PutPayload::from(key.to_string()))
            .await
            .map_err(self.store_err("upload", &out_loc))?;
        if let Some((other, _)) = existing_ok {
            // Forced: the files are mended; the manifest stays as it is.
            return Ok(if other.output == manifest.output {
                Pushed::Uploaded { files, bytes }
            } else {
                Pushed::KeptOther { output: other.output }
            });
        }
        let mac = self.mac_key.as_ref().map(|k| self.mac(k, &self.writer, &manifest_json));
        let env = Envelope { format: REMOTE_FORMAT, writer: self.writer.clone(), mac, manifest: manifest_json };
        let env_bytes = serde_json::to_vec_pretty(&env).expect("serializable");
        let loc = self.manifest_loc(key);
        // No manifest: create it. A broken one: replace exactly that version.
        let mode = match existing {
            None => PutMode::Create,
            Some((_, Some(version))) => PutMode::Update(version),
            Some((_, None)) => PutMode::Create,
        };
        let opts = PutOptions { mode, ..Default::default() };
        match self.store.put_opts(&loc, PutPayload::from(env_bytes), opts).await {
            Ok(_) => Ok(Pushed::Uploaded { files, bytes }),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                // Another writer won the race: theirs stays.
                match self.envelope(key).await? {
                    Some((b, _)) => match self.open_envelope(key, &b) {
                        Ok((other, _)) if other.output == manifest.output => Ok(Pushed::AlreadyThere),
                        Ok((other, _)) => Ok(Pushed::KeptOther { output: other.output }),
                        Err(why) => Err(RemoteError::Config {
                            url: self.url.clone(),
                            message: format!(
                                "another writer's manifest for {} won the race but is not usable: {why}",
                                key.short()
                            ),
                        }),
                    },
                    None => Err(RemoteError::Config {
                        url: self.url.clone(),
                        message: format!("the manifest of {} changed while uploading; try again", key.short()),
                    }),
                }
            }
            Err(e) => Err(self.store_err("upload", &loc)(e)),
        }
    }

    /// Uploads one local object file, checking its bytes against the manifest on the way (a
    /// local file damaged since its last check is never uploaded).
    async fn upload_file(&self, path: &FsPath, f: &FileEntry, loc: &ObjPath) -> Result<(), RemoteError> {
        use std::io::Read;
        let check = |size: u64, digest: Digest| match crate::Damage::of_bytes(path, f, size, digest) {
            Some(damage) => Err(RemoteError::Cache(CacheError::Damaged { damage })),
            None => Ok(()),
        };
        let mut file = std::fs::File::open(path).map_err(io_err("open", path))?;
        if f.size <= MULTIPART_ABOVE {
            let mut buf = Vec::with_capacity(f.size as usize);
            file.read_to_end(&mut buf).map_err(io_err("read", path))?;
            check(buf.len() as u64, Digest::from(blake3::hash(&buf)))?;
            self.store.put(loc, PutPayload::from(buf)).await.map_err(self.store_err("upload", loc))?;
            return Ok(());
        }
        let upload = self.store.put_multipart(loc).await.map_err(self.store_err("start uploading", loc))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; PART_SIZE];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(io_err("read", path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
            writer.wait_for_capacity(4).await.map_err(self.store_err("upload", loc))?;
            writer.write(&buf[..n]);
        }
        if let Err(e) = check(size, Digest::from(hasher.finalize())) {
            let _ = writer.abort().await;
            return Err(e);
        }
        writer.finish().await.map_err(self.store_err("upload", loc))?;
        Ok(())
    }

    /// The key whose remote result a hex prefix names (a key, or an output digest). `Ok(None)`
    /// when nothing matches; an error when several do.
    pub async fn find(&self, prefix: &str) -> Result<Option<Digest>, RemoteError> {
        let prefix = prefix.to_ascii_lowercase();
        if prefix.is_empty() || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let mut keys = std::collections::BTreeSet::new();
        for key in self.list("manifests", ".json").await? {
            if key.to_string().starts_with(&prefix) {
                keys.insert(key);
            }
        }
        for output in self.list("outputs", "").await? {
            if output.to_string().starts_with(&prefix) {
                let loc = self.output_loc(&output);
                let r = self.store.get(&loc).await.map_err(self.store_err("read", &loc))?;
                let text = r.bytes().await.map_err(self.store_err("read", &loc))?;
                if let Ok(key) = String::from_utf8_lossy(&text).trim().parse::<Digest>() {
                    keys.insert(key);
                }
            }
        }
        match keys.len() {
            0 => Ok(None),
            1 => Ok(keys.into_iter().next()),
            n => Err(RemoteError::Config {
                url: self.url.clone(),
                message: format!("`{prefix}` matches {n} results; give more digits"),
            }),
        }
    }

    /// One request that shows the remote answers (bucket, endpoint, credentials): a run calls
    /// it once, so a misconfigured remote is one warning, not one per stage.
    pub async fn check(&self) -> Result<(), RemoteError> {
        let loc = self.loc("manifests");
        self.store.list_with_delimiter(Some(&loc)).await.map_err(self.store_err("list", &loc))?;
        Ok(())
    }

    /// The output digest of the remote's result for `key`, when it has one this machine would
    /// use (trusted writer, valid MAC and manifest; the files are checked when pulled).
    pub async fn output_of(&self, key: &Digest) -> Result<Option<Digest>, RemoteError> {
        Ok(match self.envelope(key).await? {
            Some((bytes, _)) => self.open_envelope(key, &bytes).ok().map(|(m, _)| m.output),
            None => None,
        })
    }

    /// Every result in the remote, each with its manifest when this machine would use it, or
    /// why not (an untrusted writer, a MAC that does not verify, a broken manifest). One read
    /// per manifest; objects are not read.
    pub async fn entries(&self) -> Result<Vec<RemoteEntry>, RemoteError> {
        let mut out = Vec::new();
        for key in self.keys().await? {
            // Gone since the listing: nothing to show.
            let Some((bytes, _)) = self.envelope(&key).await? else { continue };
            let writer = serde_json::from_slice::<Envelope>(&bytes).ok().map(|e| e.writer);
            out.push(match self.open_envelope(&key, &bytes) {
                Ok((manifest, _)) => RemoteEntry { key, manifest: Some(manifest), writer, problem: None },
                Err(why) => RemoteEntry { key, manifest: None, writer, problem: Some(why) },
            });
        }
        Ok(out)
    }

    /// Keys of every remote manifest.
    pub async fn keys(&self) -> Result<Vec<Digest>, RemoteError> {
        self.list("manifests", ".json").await
    }

    async fn list(&self, dir: &str, suffix: &str) -> Result<Vec<Digest>, RemoteError> {
        let loc = self.loc(dir);
        let mut out = Vec::new();
        let mut stream = self.store.list(Some(&loc));
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(self.store_err("list", &loc))?;
            let Some(name) = meta.location.filename() else { continue };
            if let Some(d) = name.strip_suffix(suffix).and_then(|h| h.parse::<Digest>().ok()) {
                out.push(d);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// A store error in one line: S3's XML error body becomes its code and message.
fn brief(e: &object_store::Error) -> String {
    let text = e.to_string();
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find(&format!("</{name}>"))? + start;
        Some(text[start..end].to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        _ => text.lines().next().unwrap_or_default().chars().take(400).collect(),
    }
}

/// A '/'-separated relative path with only normal components.
fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\\')
        && !path.contains('\0')
        && path.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
        && FsPath::new(path).components().all(|c| matches!(c, Component::Normal(_)))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Cache {
    /// Moves a downloaded, already verified tree into the store and writes its manifest (the
    /// remote's exact bytes). Like [`Cache::publish`] but without hashing again.
    pub(crate) fn import(
        &self,
        mut staging: crate::Staging,
        manifest: &Manifest,
        bytes: &[u8],
    ) -> Result<(), CacheError> {
        let out = staging.out_dir().to_path_buf();
        crate::fsutil::seal_files(&out)?;
        crate::store::sync_tree(&out)?;
        self.place_object(&out, &manifest.output, &manifest.files)?;
        staging.mark_published();
        write_atomic(&self.manifest_path(&manifest.key), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn spec(writer: &str, trusted: &[&str], mode: RemoteMode, secret: Option<&str>) -> RemoteSpec {
        RemoteSpec {
            url: "s3://test/team".into(),
            endpoint: None,
            region: None,
            mode,
            writer: writer.into(),
            trusted_writers: trusted.iter().map(|s| s.to_string()).collect(),
            secret: secret.map(str::to_string),
        }
    }

    fn publish(cache: &Cache, key: Digest, files: &[(&str, &[u8])]) -> Manifest {
        let staging = cache.staging(&key).unwrap();
        for (path, bytes) in files {
            let p = staging.out_dir().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
        let meta = crate::ManifestMeta {
            stage_id: "s".into(),
            kind: "k".into(),
            key,
            key_inputs: serde_json::json!({}),
            summary: serde_json::json!({"rows": 3}),
            elapsed_ms: 1,
        };
        cache.publish(staging, meta, &[]).unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn push_then_pull_into_an_empty_cache_gives_the_same_bytes() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ca, cb) = (Cache::open(a.path()).unwrap(), Cache::open(b.path()).unwrap());
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let writer =
            Remote::with_store(store.clone(), "team", &spec("ci", &[], RemoteMode::ReadWrite, Some("s3cret"))).unwrap();
        let reader =
            Remote::with_store(store, "team", &spec("laptop", &["ci"], RemoteMode::Read, Some("s3cret"))).unwrap();
        let key = crate::hash_bytes("test", &[b"k"]);
        let m = publish(&ca, key, &[("a.txt", b"hello"), ("dir/b.bin", &[7u8; 1000])]);
        rt().block_on(async {
            assert_eq!(writer.push(&ca, &key, false).await.unwrap(), Pushed::Uploaded { files: 2, bytes: 1005 });
            assert_eq!(writer.push(&ca, &key, false).await.unwrap(), Pushed::AlreadyThere);
            assert!(matches!(reader.push(&cb, &key, false).await, Err(RemoteError::ReadOnly { .. })));
            assert_eq!(reader.pull(&cb, &key).await.unwrap(), Pulled::Hit(m.clone()));
            assert_eq!(reader.find(&m.output.to_string()[..10]).await.unwrap(), Some(key));
            assert_eq!(reader.find(&key.to_string()[..10]).await.unwrap(), Some(key));
        });
        let hit = cb.lookup(&key).unwrap().manifest.expect("a local hit after the pull");
        assert_eq!(hit, m);
        assert_eq!(std::fs::read(cb.manifest_path(&key)).unwrap(), std::fs::read(ca.manifest_path(&key)).unwrap());
        assert_eq!(std::fs::read(cb.object_path(&m.output).join("dir/b.bin")).unwrap(), vec![7u8; 1000]);
    }

    #[test]
    fn a_result_naming_files_of_this_machine_is_never_uploaded() {
        let a = tempfile::tempdir().unwrap();
        let ca = Cache::open(a.path()).unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let writer = Remote::with_store(store.clone(), "team", &spec("ci", &[], RemoteMode::ReadWrite, None)).unwrap();
        let key = crate::hash_bytes("test", &[b"fetch"]);
        publish(&ca, key, &[("config.json", b"{}"), (LOCAL_REFS_FILE, b"{\"format\": 1, \"files\": []}")]);
        rt().block_on(async {
            assert_eq!(writer.push(&ca, &key, false).await.unwrap(), Pushed::LocalOnly);
            assert_eq!(writer.push(&ca, &key, true).await.unwrap(), Pushed::LocalOnly);
            assert_eq!(writer.output_of(&key).await.unwrap(), None, "nothing of it reached the remote");
        });
        let listed = rt()
            .block_on(async { store.list(None).map(|m| m.unwrap().location.to_string()).collect::<Vec<_>>().await });
        assert!(listed.is_empty(), "{listed:?}");
    }

    #[test]
    fn untrusted_writers_bad_macs_and_damaged_files_are_rejected() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ca, cb) = (Cache::open(a.path()).unwrap(), Cache::open(b.path()).unwrap());
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let writer = Remote::with_store(store.clone(), "", &spec("mallory", &[], RemoteMode::ReadWrite, None)).unwrap();
        let key = crate::hash_bytes("test", &[b"k2"]);
        let m = publish(&ca, key, &[("data.parquet", b"rows")]);
        rt().block_on(async {
            writer.push(&ca, &key, false).await.unwrap();
            // Not trusted.
            let reader = Remote::with_store(store.clone(), "", &spec("me", &["ci"], RemoteMode::Read, None)).unwrap();
            assert!(matches!(reader.pull(&cb, &key).await.unwrap(), Pulled::Rejected(w) if w.contains("mallory")));
            // Trusted by name, but a secret is configured and the manifest has no MAC.
            let reader =
                Remote::with_store(store.clone(), "", &spec("me", &["mallory"], RemoteMode::Read, Some("x"))).unwrap();
            assert!(matches!(reader.pull(&cb, &key).await.unwrap(), Pulled::Rejected(w) if w.contains("no MAC")));
            // Trusted, but the file was changed in the bucket (same size).
            let reader = Remote::with_store(store.clone(), "", &spec("me", &["*"], RemoteMode::Read, None)).unwrap();
            store.put(&reader.object_loc(&m.output, "data.parquet"), PutPayload::from_static(b"ROWS")).await.unwrap();
            assert!(matches!(reader.pull(&cb, &key).await.unwrap(), Pulled::Rejected(w) if w.contains("digest")));
            assert!(!cb.lookup(&key).unwrap().is_hit(), "nothing of a rejected pull is visible");
            // The writer mends it (forced push after its own re-run), and the pull works.
            assert_eq!(writer.push(&ca, &key, true).await.unwrap(), Pushed::Uploaded { files: 1, bytes: 4 });
            assert!(matches!(reader.pull(&cb, &key).await.unwrap(), Pulled::Hit(_)));
        });
    }

    #[test]
    fn of_two_writers_of_one_key_one_result_stays() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ca, cb) = (Cache::open(a.path()).unwrap(), Cache::open(b.path()).unwrap());
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let w1 = Remote::with_store(store.clone(), "p", &spec("one", &["*"], RemoteMode::ReadWrite, None)).unwrap();
        let w2 = Remote::with_store(store.clone(), "p", &spec("two", &["*"], RemoteMode::ReadWrite, None)).unwrap();
        let key = crate::hash_bytes("test", &[b"k3"]);
        let m1 = publish(&ca, key, &[("out", b"first")]);
        let m2 = publish(&cb, key, &[("out", b"second")]);
        rt().block_on(async {
            let (r1, r2) = futures::join!(w1.push(&ca, &key, false), w2.push(&cb, &key, false));
            let (r1, r2) = (r1.unwrap(), r2.unwrap());
            let winner = match (&r1, &r2) {
                (Pushed::Uploaded { .. }, Pushed::KeptOther { output }) => {
                    assert_eq!(*output, m1.output);
                    m1.output
                }
                (Pushed::KeptOther { output }, Pushed::Uploaded { .. }) => {
                    assert_eq!(*output, m2.output);
                    m2.output
                }
                other => panic!("exactly one writer must win: {other:?}"),
            };
            let c = tempfile::tempdir().unwrap();
            let cc = Cache::open(c.path()).unwrap();
            match w1.pull(&cc, &key).await.unwrap() {
                Pulled::Hit(m) => assert_eq!(m.output, winner),
                other => panic!("{other:?}"),
            }
        });
    }

    #[test]
    fn a_file_above_the_multipart_threshold_goes_up_in_parts_and_comes_back_whole() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ca, cb) = (Cache::open(a.path()).unwrap(), Cache::open(b.path()).unwrap());
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let w = Remote::with_store(store.clone(), "big", &spec("ci", &[], RemoteMode::ReadWrite, None)).unwrap();
        let r = Remote::with_store(store, "big", &spec("me", &["ci"], RemoteMode::Read, None)).unwrap();
        let size = MULTIPART_ABOVE as usize + PART_SIZE + 12345;
        let big: Vec<u8> = (0..size).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let key = crate::hash_bytes("test", &[b"big"]);
        let m = publish(&ca, key, &[("model.safetensors", &big)]);
        rt().block_on(async {
            assert_eq!(w.push(&ca, &key, false).await.unwrap(), Pushed::Uploaded { files: 1, bytes: size as u64 });
            assert_eq!(r.pull(&cb, &key).await.unwrap(), Pulled::Hit(m.clone()));
        });
        assert!(std::fs::read(cb.object_path(&m.output).join("model.safetensors")).unwrap() == big);
    }

    #[test]
    fn unsafe_paths_in_a_remote_manifest_are_refused() {
        for bad in ["../x", "/etc/passwd", "a//b", "a/./b", "a\\b", ""] {
            assert!(!safe_relative(bad), "{bad}");
        }
        assert!(safe_relative("adapter/adapter_model.safetensors"));
    }
}
