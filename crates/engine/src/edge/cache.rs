//! The edge cache: GET and HEAD responses of the paths a tunnel's policy
//! names, kept as HTTP caching allows (RFC 9111), served without the agent.
//!
//! One store per published hostname (and path prefix), so a reconnecting
//! agent finds its cache warm. Concurrent misses for one target collapse
//! into a single upstream fetch: the first request leads, a task reads the
//! service's body into a [`Fill`], and every client (the leader too) reads
//! from the fill as it grows, each at its own pace; a slow client never
//! slows the fetch. A complete fill becomes an [`Entry`], in memory or, with
//! `edge.cache_dir`, in a file written under a temporary name and renamed.
//! Each store is bounded by the policy's `max_bytes` (least recently used
//! objects go first) and `max_object_bytes` (bigger responses pass through
//! uncached). An answer of unknown length is shared once complete: if it
//! outgrows what may be stored, it is handed to its leader's client alone.
//!
//! What is stored: `200` answers to requests without `Authorization`
//! (unless the response says `public`), with a lifetime (`s-maxage`,
//! `max-age`, `Expires`, or `immutable`), and none of `no-store`,
//! `no-cache`, `private`, `Set-Cookie`, `Vary: *`. A request asking for
//! `no-cache` or `no-store` bypasses the cache. `Range` requests are served
//! from a stored object (`206`, or `416`).

use std::collections::{BTreeMap, HashMap};
use std::io::SeekFrom;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::headers;
use super::http::PublicBody;
use crate::policy::{CacheRule, Glob};

/// The header that says how the cache served a response.
pub const X_STRAIT_CACHE: HeaderName = HeaderName::from_static("x-strait-cache");

/// How long to keep an `immutable` response that gives no lifetime.
const IMMUTABLE_LIFETIME: Duration = Duration::from_secs(365 * 86_400);
/// How long clients wait for an answer of unknown length to complete
/// before they fetch for themselves.
const UNSIZED_JOIN_WAIT: Duration = Duration::from_secs(10);
/// Bytes read from a stored file per frame.
const FILE_CHUNK: usize = 64 * 1024;

/// Every hostname's store, and where objects go on disk.
pub struct Cache {
    dir: Option<PathBuf>,
    stores: Mutex<HashMap<String, Arc<Store>>>,
    next_file: AtomicU64,
    budget: Arc<Budget>,
}

/// What all stores together may hold (`edge.cache_max_bytes`): a tenant's
/// `max_bytes` is its own bound within this, never past it.
struct Budget {
    max: u64,
    used: AtomicU64,
}

impl Budget {
    fn reserve(&self, size: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| (u + size <= self.max).then_some(u + size))
            .is_ok()
    }

    fn release(&self, size: u64) {
        self.used.fetch_sub(size, Ordering::AcqRel);
    }
}

/// Bytes held from a [`Budget`] for as long as this lives.
struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Reservation {
    fn new(budget: Arc<Budget>) -> Self {
        Reservation { budget, bytes: 0 }
    }

    /// Holds `size` bytes more; false (and nothing more held) past the budget.
    fn grow(&mut self, size: u64) -> bool {
        let held = self.budget.reserve(size);
        if held {
            self.bytes += size;
        }
        held
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl Cache {
    /// A cache keeping objects in memory, or in `dir` (emptied first: the
    /// cache does not outlive the engine).
    pub fn new(dir: Option<PathBuf>, max_bytes: u64) -> std::io::Result<Self> {
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir)?;
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                if path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("obj-") || n.starts_with("tmp-"))
                {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let budget = Arc::new(Budget { max: max_bytes, used: AtomicU64::new(0) });
        Ok(Self { dir, stores: Mutex::new(HashMap::new()), next_file: AtomicU64::new(0), budget })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Store>>> {
        self.stores.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store of a hostname (and path prefix), made on first use; its
    /// limits follow the newest rule.
    pub fn store(&self, name: &str, rule: &CacheRule) -> Arc<Store> {
        let mut stores = self.lock();
        let store = stores.entry(name.to_string()).or_insert_with(|| Arc::new(Store::new(self.budget.clone()))).clone();
        store.set_limits(rule.max_bytes, rule.max_object_bytes);
        store
    }

    /// Drops the objects of a store whose target matches `glob` (all
    /// without one). Returns how many went.
    pub fn purge(&self, name: &str, glob: Option<&Glob>) -> usize {
        let Some(store) = self.lock().get(name).cloned() else { return 0 };
        store.purge(glob)
    }

    fn file_path(&self, prefix: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(dir.join(format!("{prefix}-{}", self.next_file.fetch_add(1, Ordering::Relaxed))))
    }
}

/// The objects of one hostname.
pub struct Store {
    inner: Mutex<Inner>,
}

struct Inner {
    budget: Arc<Budget>,
    max_bytes: u64,
    max_object_bytes: u64,
    used: u64,
    entries: HashMap<String, Arc<Entry>>,
    /// Targets by last use, oldest first.
    recency: BTreeMap<u64, String>,
    clock: u64,
    fills: HashMap<String, Arc<Fill>>,
}

/// How a request meets the cache.
pub enum Lookup {
    /// A fresh object.
    Hit(Arc<Entry>),
    /// Another request is fetching it: read along.
    Coalesced(Arc<Fill>),
    /// Fetch it; other requests for it wait on this fill.
    Lead(Leader),
}

impl Store {
    fn new(budget: Arc<Budget>) -> Self {
        Store {
            inner: Mutex::new(Inner {
                budget,
                max_bytes: 0,
                max_object_bytes: 0,
                used: 0,
                entries: HashMap::new(),
                recency: BTreeMap::new(),
                clock: 0,
                fills: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_limits(&self, max_bytes: u64, max_object_bytes: u64) {
        let mut inner = self.lock();
        inner.max_bytes = max_bytes.min(inner.budget.max);
        inner.max_object_bytes = max_object_bytes.min(inner.budget.max);
    }

    pub fn max_object_bytes(&self) -> u64 {
        self.lock().max_object_bytes
    }

    /// What the cache has for `target`, given the request's headers.
    pub fn lookup(self: &Arc<Self>, target: &str, request: &HeaderMap) -> Lookup {
        if let Some(entry) = self.hit(target, request) {
            return Lookup::Hit(entry);
        }
        let mut inner = self.lock();
        let authorized = request.contains_key(header::AUTHORIZATION);
        if let Some(fill) = inner.fills.get(target)
            && fill.vary_matches(request)
            && !authorized
        {
            return Lookup::Coalesced(fill.clone());
        }
        let fill = Arc::new(Fill::new(request));
        if !authorized {
            inner.fills.insert(target.to_string(), fill.clone());
        }
        Lookup::Lead(Leader { store: self.clone(), target: target.to_string(), fill, registered: !authorized })
    }

    /// A fresh object for `target` this request may have, if any.
    pub fn hit(&self, target: &str, request: &HeaderMap) -> Option<Arc<Entry>> {
        let mut inner = self.lock();
        let entry = inner.entries.get(target)?.clone();
        let authorized = request.contains_key(header::AUTHORIZATION);
        let usable = entry.fresh() && entry.varies_like(request) && (!authorized || entry.public);
        if usable {
            inner.touch(target, &entry);
        }
        usable.then_some(entry)
    }

    fn purge(&self, glob: Option<&Glob>) -> usize {
        let mut inner = self.lock();
        let gone: Vec<String> = inner
            .entries
            .keys()
            .filter(|t| glob.is_none_or(|g| g.matches(t.split('?').next().unwrap_or_default())))
            .cloned()
            .collect();
        for target in &gone {
            inner.remove(target);
        }
        gone.len()
    }

    /// Keeps an object (unless it is over the object limit), evicting the
    /// least recently used to make room.
    fn insert(&self, target: String, entry: Entry) -> Option<Arc<Entry>> {
        let mut inner = self.lock();
        if entry.size > inner.max_object_bytes {
            return None;
        }
        inner.remove(&target);
        while inner.used + entry.size > inner.max_bytes {
            let Some((_, oldest)) = inner.recency.pop_first() else { break };
            inner.remove(&oldest);
        }
        // Within the engine's budget: this store's own oldest objects make
        // room; if that is not enough, the object is not kept.
        while !inner.budget.reserve(entry.size) {
            let (_, oldest) = inner.recency.pop_first()?;
            inner.remove(&oldest);
        }
        let entry = Arc::new(entry);
        inner.used += entry.size;
        inner.clock += 1;
        let stamp = inner.clock;
        entry.stamp.store(stamp, Ordering::Relaxed);
        inner.recency.insert(stamp, target.clone());
        inner.entries.insert(target, entry.clone());
        Some(entry)
    }

    /// Points a stored object at its file, if it is still the one stored
    /// (else the file is not needed).
    fn move_to_file(&self, target: &str, stored: &Arc<Entry>, path: PathBuf) {
        let mut inner = self.lock();
        let current = inner.entries.get(target).filter(|e| Arc::ptr_eq(e, stored)).cloned();
        let Some(old) = current else {
            drop(inner);
            let _ = std::fs::remove_file(path);
            return;
        };
        let entry = Arc::new(Entry {
            head: old.head.clone(),
            body: Stored::File { path },
            size: old.size,
            stored: old.stored,
            stored_at: old.stored_at,
            fresh_for: old.fresh_for,
            vary: old.vary.clone(),
            public: old.public,
            stamp: AtomicU64::new(old.stamp.load(Ordering::Relaxed)),
        });
        inner.entries.insert(target.to_string(), entry);
    }

    #[cfg(test)]
    fn used(&self) -> (usize, u64) {
        let inner = self.lock();
        (inner.entries.len(), inner.used)
    }
}

impl Inner {
    fn touch(&mut self, target: &str, entry: &Entry) {
        self.clock += 1;
        let old = entry.stamp.swap(self.clock, Ordering::Relaxed);
        self.recency.remove(&old);
        self.recency.insert(self.clock, target.to_string());
    }

    fn remove(&mut self, target: &str) {
        if let Some(entry) = self.entries.remove(target) {
            self.used -= entry.size;
            self.budget.release(entry.size);
            self.recency.remove(&entry.stamp.load(Ordering::Relaxed));
            // A file still being served stays open for its readers.
            if let Stored::File { path, .. } = &entry.body {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A stored response.
pub struct Entry {
    head: HeaderMap,
    body: Stored,
    size: u64,
    stored: Instant,
    stored_at: SystemTime,
    fresh_for: Duration,
    /// The request headers the response varies on, as they were.
    vary: Vec<(HeaderName, Option<HeaderValue>)>,
    public: bool,
    stamp: AtomicU64,
}

enum Stored {
    /// The body as it came, chunk by chunk.
    Memory(Vec<Bytes>),
    File {
        path: PathBuf,
    },
}

impl Entry {
    fn fresh(&self) -> bool {
        self.stored.elapsed() < self.fresh_for
    }

    fn varies_like(&self, request: &HeaderMap) -> bool {
        self.vary.iter().all(|(name, value)| request.get(name) == value.as_ref())
    }

    /// The response for a request (`HEAD`, `Range`, `If-None-Match`).
    pub fn respond(self: &Arc<Self>, method: &Method, request: &HeaderMap) -> Response<PublicBody> {
        let len = self.size;
        let mut head = self.head.clone();
        let age = self.stored_at.elapsed().unwrap_or_default().as_secs();
        head.insert(header::AGE, HeaderValue::from(age));
        head.insert(X_STRAIT_CACHE, HeaderValue::from_static("HIT"));
        head.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        let etag = head.get(header::ETAG).cloned();
        if let (Some(etag), Some(asked)) = (etag, request.get(header::IF_NONE_MATCH))
            && asked
                .to_str()
                .is_ok_and(|a| a.split(',').any(|t| t.trim() == "*" || t.trim() == etag.to_str().unwrap_or("")))
        {
            head.remove(header::CONTENT_LENGTH);
            return build(StatusCode::NOT_MODIFIED, head, empty());
        }
        let (status, start, end) = match request.get(header::RANGE).and_then(|r| r.to_str().ok()) {
            None => (StatusCode::OK, 0, len),
            Some(range) => match parse_range(range, len) {
                Ok(Some((start, end))) => {
                    let value = format!("bytes {start}-{}/{len}", end - 1);
                    head.insert(header::CONTENT_RANGE, HeaderValue::try_from(value).expect("digits"));
                    (StatusCode::PARTIAL_CONTENT, start, end)
                }
                // Several ranges, or a form we do not serve: the whole.
                Ok(None) => (StatusCode::OK, 0, len),
                Err(()) => {
                    let value = format!("bytes */{len}");
                    head.insert(header::CONTENT_RANGE, HeaderValue::try_from(value).expect("digits"));
                    head.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
                    return build(StatusCode::RANGE_NOT_SATISFIABLE, head, empty());
                }
            },
        };
        head.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
        if method == Method::HEAD {
            return build(status, head, empty());
        }
        let body = match &self.body {
            Stored::Memory(chunks) => ChunksBody { chunks: slices(chunks, start, end).into() }.boxed_unsync(),
            Stored::File { path, .. } => FileBody::open(path.clone(), start, end - start).boxed_unsync(),
        };
        build(status, head, body)
    }
}

fn build(status: StatusCode, head: HeaderMap, body: PublicBody) -> Response<PublicBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = head;
    response
}

fn empty() -> PublicBody {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The parts of `chunks` that hold bytes `[start, end)` of the whole.
fn slices(chunks: &[Bytes], start: u64, end: u64) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for chunk in chunks {
        let (from, to) = (at, at + chunk.len() as u64);
        at = to;
        if to <= start || from >= end {
            continue;
        }
        let a = start.saturating_sub(from) as usize;
        let b = (end.min(to) - from) as usize;
        out.push(chunk.slice(a..b));
    }
    out
}

/// A body of chunks already in memory.
struct ChunksBody {
    chunks: std::collections::VecDeque<Bytes>,
}

impl Body for ChunksBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.chunks.iter().map(|c| c.len() as u64).sum())
    }
}

/// One `bytes=` range of an object of `len` bytes, as `[start, end)`.
/// `Ok(None)`: not one range we serve (several, another unit): the whole
/// object. `Err`: nothing of it is in the object (416).
fn parse_range(value: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return Ok(None) };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| s.parse::<u64>().map_err(|_| ());
    let (start, end) = match (first.is_empty(), last.is_empty()) {
        (true, true) => return Ok(None),
        (true, false) => {
            let suffix = parse(last).map_err(|_| ()).or(Err(()));
            let Ok(suffix) = suffix else { return Ok(None) };
            if suffix == 0 {
                return Err(());
            }
            (len.saturating_sub(suffix), len)
        }
        (false, _) => {
            let Ok(start) = parse(first) else { return Ok(None) };
            let end = if last.is_empty() {
                len
            } else {
                let Ok(last) = parse(last) else { return Ok(None) };
                if last < start {
                    return Ok(None);
                }
                (last + 1).min(len)
            };
            (start, end)
        }
    };
    if start >= len || start >= end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// A stored file's bytes `[start, start + len)`, read a chunk at a time.
struct FileBody {
    state: FileState,
    left: u64,
}

enum FileState {
    Opening(Pin<Box<dyn Future<Output = std::io::Result<tokio::fs::File>> + Send>>),
    Reading(Pin<Box<dyn Future<Output = (tokio::fs::File, std::io::Result<Bytes>)> + Send>>),
    Idle(Option<tokio::fs::File>),
}

impl FileBody {
    fn open(path: PathBuf, start: u64, len: u64) -> Self {
        let opening = async move {
            let mut file = tokio::fs::File::open(path).await?;
            file.seek(SeekFrom::Start(start)).await?;
            Ok(file)
        };
        FileBody { state: FileState::Opening(Box::pin(opening)), left: len }
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            match &mut self.state {
                FileState::Opening(opening) => match opening.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    // hyper::Error cannot be made here: a file gone under a
                    // reader ends the body short, which the client sees as
                    // a cut transfer (its length was announced).
                    Poll::Ready(Err(error)) => {
                        tracing::warn!(%error, "cached object unreadable");
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Ok(file)) => self.state = FileState::Idle(Some(file)),
                },
                FileState::Idle(file) => {
                    let mut file = file.take().expect("a file between reads");
                    let want = (self.left as usize).min(FILE_CHUNK);
                    self.state = FileState::Reading(Box::pin(async move {
                        let mut buf = vec![0u8; want];
                        let read = file.read_exact(&mut buf).await.map(|_| Bytes::from(buf));
                        (file, read)
                    }));
                }
                FileState::Reading(reading) => match reading.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready((file, Ok(bytes))) => {
                        self.left -= bytes.len() as u64;
                        self.state = FileState::Idle(Some(file));
                        return Poll::Ready(Some(Ok(Frame::data(bytes))));
                    }
                    Poll::Ready((_, Err(error))) => {
                        tracing::warn!(%error, "cached object unreadable");
                        return Poll::Ready(None);
                    }
                },
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// An object being fetched, and the clients reading it as it comes.
pub struct Fill {
    progress: watch::Sender<Progress>,
    head: Mutex<Option<(StatusCode, HeaderMap)>>,
    chunks: Mutex<Vec<Bytes>>,
    /// The leader's request headers the response may vary on.
    request: HeaderMap,
    /// The answer's length is known, so its readers can share it as it
    /// comes. One of unknown length may outgrow what may be stored; then
    /// it is handed to the leader's client alone, so others wait for it
    /// to complete before they read.
    shared_as_it_comes: std::sync::atomic::AtomicBool,
    /// An answer that outgrew what may be stored: the rest of the
    /// service's body, for the leader's client to read after the chunks.
    rest: Mutex<Option<PublicBody>>,
    /// The chunks' bytes, held from the engine's budget while an answer
    /// handed to its leader's client is read.
    held: Mutex<Option<Reservation>>,
    /// Why the service's body broke off, for the one reader of an answer
    /// of unknown length: without a length, only an error tells its client
    /// that the body is incomplete.
    failure: Mutex<Option<hyper::Error>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// The service has not answered yet.
    Waiting,
    /// The head is in and `n` chunks of the body.
    Body(usize),
    /// The whole body is in (`n` chunks).
    Done(usize),
    /// The fetch failed or its answer is not to be shared: readers that
    /// have no byte yet fetch for themselves.
    Abandoned,
    /// The body broke off after `n` chunks.
    Broken(usize),
    /// Too large to store after `n` chunks: the leader's client reads the
    /// rest straight from the service.
    Handed(usize),
}

impl Fill {
    fn new(request: &HeaderMap) -> Self {
        Fill {
            progress: watch::channel(Progress::Waiting).0,
            head: Mutex::new(None),
            chunks: Mutex::new(Vec::new()),
            request: request.clone(),
            shared_as_it_comes: Default::default(),
            rest: Mutex::new(None),
            held: Mutex::new(None),
            failure: Mutex::new(None),
        }
    }

    fn vary_matches(&self, request: &HeaderMap) -> bool {
        // Until the head says what it varies on, compare what commonly
        // matters; after, exactly its Vary.
        let head = self.head.lock().unwrap_or_else(|e| e.into_inner());
        let names: Vec<HeaderName> = match &*head {
            Some((_, headers)) => vary_names(headers).unwrap_or_default(),
            None => vec![header::ACCEPT_ENCODING],
        };
        names.iter().all(|n| request.get(n) == self.request.get(n))
    }

    /// Waits for the head. `None`: the fetch will not be shared; fetch
    /// alone.
    pub async fn joined(self: &Arc<Self>) -> Option<Response<PublicBody>> {
        let mut progress = self.progress.subscribe();
        let mut state = progress.wait_for(|p| *p != Progress::Waiting).await.ok().map(|p| *p)?;
        let shared = self.shared_as_it_comes.load(Ordering::Acquire);
        if !shared {
            // Bounded: a service that trickles a body must not hold every
            // other client; past the wait they fetch for themselves.
            let complete = progress.wait_for(|p| !matches!(p, Progress::Body(_)));
            state = tokio::time::timeout(UNSIZED_JOIN_WAIT, complete).await.ok()?.ok().map(|p| *p)?;
        }
        match state {
            Progress::Abandoned | Progress::Handed(_) => None,
            Progress::Broken(_) if !shared => None,
            // Complete, only not yet stored: as good as a hit.
            Progress::Done(_) => Some(self.reader("HIT")),
            _ => Some(self.reader("COALESCED")),
        }
    }

    /// The response a client reads from this fill.
    fn reader(self: &Arc<Self>, how: &'static str) -> Response<PublicBody> {
        let (status, mut head) = self.head.lock().unwrap_or_else(|e| e.into_inner()).clone().expect("a head by now");
        head.insert(X_STRAIT_CACHE, HeaderValue::from_static(how));
        let body =
            FillBody { fill: self.clone(), next: 0, progress: self.progress.subscribe(), waiting: None, rest: None };
        build(status, head, body.boxed_unsync())
    }

    fn push(&self, chunk: Bytes) {
        let n = {
            let mut chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
            chunks.push(chunk);
            chunks.len()
        };
        self.progress.send_replace(Progress::Body(n));
    }

    fn chunk(&self, i: usize) -> Option<Bytes> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner()).get(i).cloned()
    }
}

/// A client's view of a fill: every chunk in order, waiting for the next.
struct FillBody {
    fill: Arc<Fill>,
    next: usize,
    progress: watch::Receiver<Progress>,
    waiting: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The service's body, once the fill was handed to this reader.
    rest: Option<PublicBody>,
}

impl Body for FillBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            if let Some(rest) = self.rest.as_mut() {
                return match Pin::new(rest).poll_frame(cx) {
                    // Trailers are not passed on, as for a filled body.
                    Poll::Ready(Some(Ok(frame))) if !frame.is_data() => continue,
                    other => other,
                };
            }
            if let Some(chunk) = self.fill.chunk(self.next) {
                self.next += 1;
                self.waiting = None;
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            let state = *self.progress.borrow_and_update();
            match state {
                Progress::Done(n) if self.next >= n => return Poll::Ready(None),
                Progress::Broken(n) if self.next >= n => {
                    let failure = self.fill.failure.lock().unwrap_or_else(|e| e.into_inner()).take();
                    return Poll::Ready(failure.map(Err));
                }
                Progress::Handed(n) if self.next >= n => {
                    let rest = self.fill.rest.lock().unwrap_or_else(|e| e.into_inner()).take();
                    match rest {
                        Some(rest) => {
                            // Nobody else reads a handed fill: its chunks
                            // and their share of the budget go now.
                            self.fill.chunks.lock().unwrap_or_else(|e| e.into_inner()).clear();
                            drop(self.fill.held.lock().unwrap_or_else(|e| e.into_inner()).take());
                            self.rest = Some(rest);
                        }
                        None => return Poll::Ready(None),
                    }
                    continue;
                }
                Progress::Abandoned => return Poll::Ready(None),
                _ => {}
            }
            if self.waiting.is_none() {
                let mut progress = self.progress.clone();
                self.waiting = Some(Box::pin(async move {
                    let _ = progress.changed().await;
                }));
            }
            match self.waiting.as_mut().expect("set above").as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => self.waiting = None,
            }
        }
    }
}

/// The request that fetches for everyone.
pub struct Leader {
    store: Arc<Store>,
    target: String,
    fill: Arc<Fill>,
    registered: bool,
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Never shared (an error, an answer not to keep): waiters go alone.
        // A fetch dropped half way (the engine shutting down) ends its
        // readers' bodies as broken rather than leaving them waiting.
        self.fill.progress.send_if_modified(|p| match *p {
            Progress::Waiting => {
                *p = Progress::Abandoned;
                true
            }
            Progress::Body(n) => {
                *p = Progress::Broken(n);
                true
            }
            _ => false,
        });
        self.unregister();
    }
}

impl Leader {
    fn unregister(&mut self) {
        if std::mem::take(&mut self.registered) {
            let mut inner = self.store.lock();
            if inner.fills.get(&self.target).is_some_and(|f| Arc::ptr_eq(f, &self.fill)) {
                inner.fills.remove(&self.target);
            }
        }
    }

    /// Takes the service's answer. A storable one is read into the fill by
    /// a task of its own, and stored when complete; the leader's client
    /// reads it from the fill as the others do. Anything else passes back
    /// as it is (and waiters fetch alone).
    pub fn answer(
        self,
        cache: &Arc<Cache>,
        tasks: &tokio_util::task::TaskTracker,
        response: Response<PublicBody>,
        requested_authorization: bool,
    ) -> Response<PublicBody> {
        let Some(lifetime) = storable(&response, requested_authorization) else {
            let mut response = response;
            response.headers_mut().insert(X_STRAIT_CACHE, HeaderValue::from_static("MISS"));
            return response;
        };
        // A fill's bytes are held from the engine's budget while they are
        // in memory, so a service cannot grow one past what the engine
        // allows: the whole length up front when it is known, else as the
        // chunks come.
        let max_object = self.store.max_object_bytes();
        let mut reservation = Reservation::new(self.store.lock().budget.clone());
        let len = response.body().size_hint().exact();
        if len.is_some_and(|len| len > max_object || !reservation.grow(len)) {
            let mut response = response;
            response.headers_mut().insert(X_STRAIT_CACHE, HeaderValue::from_static("MISS"));
            return response;
        }
        self.fill.shared_as_it_comes.store(len.is_some(), Ordering::Release);
        let (parts, body) = response.into_parts();
        let mut head = parts.headers;
        headers::strip_hop_by_hop(&mut head, false);
        head.remove(X_STRAIT_CACHE);
        // Readers of the fill get the service's length; the stored object
        // gets one per answer (a range has its own).
        *self.fill.head.lock().unwrap_or_else(|e| e.into_inner()) = Some((parts.status, head.clone()));
        head.remove(header::CONTENT_LENGTH);
        self.fill.progress.send_replace(Progress::Body(0));
        let reader = self.fill.reader("MISS");
        let cache = cache.clone();
        tasks.spawn(self.fetch(cache, body, head, lifetime, len, reservation));
        reader
    }

    async fn fetch(
        mut self,
        cache: Arc<Cache>,
        mut body: PublicBody,
        head: HeaderMap,
        lifetime: Duration,
        len: Option<u64>,
        mut reservation: Reservation,
    ) {
        let max_object = self.store.max_object_bytes();
        let mut size = 0u64;
        let mut ok = true;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        size += data.len() as u64;
                        if len.is_some_and(|len| size > len) {
                            // hyper holds a body to its length; never trust it blindly.
                            ok = false;
                            break;
                        }
                        if len.is_none() && (size > max_object || !reservation.grow(data.len() as u64)) {
                            // Too large to keep: the leader's client reads
                            // the rest straight from the service, nobody
                            // else reads this fill, and what it holds stays
                            // counted until that client is done.
                            self.fill.push(data);
                            *self.fill.rest.lock().unwrap_or_else(|e| e.into_inner()) = Some(body);
                            *self.fill.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(reservation);
                            let n = self.fill.chunks.lock().unwrap_or_else(|e| e.into_inner()).len();
                            self.fill.progress.send_replace(Progress::Handed(n));
                            self.unregister();
                            return;
                        }
                        self.fill.push(data);
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, target = %self.target, "cache fill broke off");
                    if len.is_none() {
                        *self.fill.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
                    }
                    ok = false;
                    break;
                }
            }
        }
        let chunks = self.fill.chunks.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // The fill's reservation ends; the stored object reserves its own.
        drop(reservation);
        let stored = if ok && len.is_none_or(|len| size == len) {
            // Stored before any reader sees the end, so a request after a
            // complete response always finds the object.
            let vary = vary_names(&head)
                .unwrap_or_default()
                .into_iter()
                .map(|n| {
                    let value = self.fill.request.get(&n).cloned();
                    (n, value)
                })
                .collect();
            let public = cache_control(&head).iter().any(|d| d == "public");
            let entry = Entry {
                head,
                body: Stored::Memory(chunks.clone()),
                size,
                stored: Instant::now(),
                stored_at: SystemTime::now(),
                fresh_for: lifetime,
                vary,
                public,
                stamp: AtomicU64::new(0),
            };
            self.store.insert(self.target.clone(), entry)
        } else {
            None
        };
        let n = chunks.len();
        self.fill.progress.send_replace(if ok { Progress::Done(n) } else { Progress::Broken(n) });
        self.unregister();
        // With a cache directory the object then moves to a file, and its
        // memory goes once the readers of the fill are done.
        if let Some(entry) = stored
            && let Some(path) = write_object(&cache, &chunks).await
        {
            self.store.move_to_file(&self.target, &entry, path);
        }
    }
}

/// Writes an object under a temporary name and renames it into place.
async fn write_object(cache: &Cache, chunks: &[Bytes]) -> Option<PathBuf> {
    let tmp = cache.file_path("tmp")?;
    let path = cache.file_path("obj")?;
    let written = async {
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::File::create(&tmp).await?;
        for chunk in chunks {
            file.write_all(chunk).await?;
        }
        file.sync_data().await?;
        tokio::fs::rename(&tmp, &path).await
    };
    match written.await {
        Ok(()) => Some(path),
        Err(error) => {
            tracing::warn!(%error, "cache object not written; it stays in memory");
            let _ = tokio::fs::remove_file(&tmp).await;
            None
        }
    }
}

/// The lowercase directives of `Cache-Control`.
fn cache_control(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase())
        .filter(|d| !d.is_empty())
        .collect()
}

fn directive_seconds(directives: &[String], name: &str) -> Option<u64> {
    directives.iter().find_map(|d| d.strip_prefix(name)?.strip_prefix('=')?.trim_matches('"').parse().ok())
}

/// The header names a response varies on; `None` for `Vary: *`.
fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY).iter().filter_map(|v| v.to_str().ok()) {
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return None;
            }
            names.push(HeaderName::try_from(name.to_ascii_lowercase()).ok()?);
        }
    }
    Some(names)
}

/// How long a response may be served from the cache, if it may be stored.
fn storable(response: &Response<PublicBody>, requested_authorization: bool) -> Option<Duration> {
    if response.status() != StatusCode::OK {
        return None;
    }
    let headers = response.headers();
    let directives = cache_control(headers);
    let has = |d: &str| directives.iter().any(|x| x == d || x.starts_with(&format!("{d}=")));
    if has("no-store") || has("no-cache") || has("private") || headers.contains_key(header::SET_COOKIE) {
        return None;
    }
    if requested_authorization && !has("public") && !has("s-maxage") {
        return None;
    }
    vary_names(headers)?;
    let lifetime = directive_seconds(&directives, "s-maxage")
        .or_else(|| directive_seconds(&directives, "max-age"))
        .map(Duration::from_secs)
        .or_else(|| {
            let expires = httpdate(headers.get(header::EXPIRES)?)?;
            let date = headers.get(header::DATE).and_then(httpdate).unwrap_or_else(SystemTime::now);
            Some(expires.duration_since(date).unwrap_or_default())
        })
        .or_else(|| has("immutable").then_some(IMMUTABLE_LIFETIME))?;
    (!lifetime.is_zero()).then_some(lifetime)
}

fn httpdate(value: &HeaderValue) -> Option<SystemTime> {
    let text = value.to_str().ok()?;
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let parsed = time::PrimitiveDateTime::parse(text, &format).ok()?;
    Some(parsed.assume_utc().into())
}

/// The store a tunnel's objects live in: its hostname and path prefix, so
/// the tunnel of a reconnecting agent finds them.
pub fn store_name(tunnel: &crate::registry::Tunnel) -> String {
    format!("{}{}", tunnel.hostname().unwrap_or_default(), tunnel.spec.route.prefix.as_deref().unwrap_or(""))
}

/// Whether a request may use the cache at all: `GET` or `HEAD`, no
/// `no-cache`/`no-store` asked. (`Range` and conditionals are served from
/// a stored object, not fetched as such.)
pub fn eligible(method: &Method, request: &HeaderMap) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    let directives = cache_control(request);
    let pragma = request.get(header::PRAGMA).and_then(|v| v.to_str().ok()).is_some_and(|p| p.contains("no-cache"));
    !(pragma || directives.iter().any(|d| d == "no-cache" || d == "no-store"))
}

/// Keeps only what the fetch for everyone should ask: not one client's
/// range or validators.
pub fn for_everyone(request: &mut HeaderMap) {
    for name in [header::RANGE, header::IF_RANGE, header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE] {
        request.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(headers: &[(&str, &str)]) -> Response<PublicBody> {
        let mut r = build(StatusCode::OK, HeaderMap::new(), empty());
        for (k, v) in headers {
            r.headers_mut().append(HeaderName::try_from(*k).unwrap(), HeaderValue::try_from(*v).unwrap());
        }
        r
    }

    #[test]
    fn what_is_stored_and_for_how_long() {
        let secs = |h: &[(&str, &str)], auth| storable(&response(h), auth).map(|d| d.as_secs());
        assert_eq!(secs(&[("cache-control", "max-age=60")], false), Some(60));
        assert_eq!(secs(&[("cache-control", "max-age=60, s-maxage=600")], false), Some(600));
        assert_eq!(secs(&[("cache-control", "public, max-age=31536000, immutable")], false), Some(31_536_000));
        assert_eq!(secs(&[("cache-control", "immutable")], false), Some(IMMUTABLE_LIFETIME.as_secs()));
        assert_eq!(
            secs(&[("date", "Tue, 01 Dec 2026 10:00:00 GMT"), ("expires", "Tue, 01 Dec 2026 10:05:00 GMT")], false),
            Some(300)
        );
        for refused in [
            vec![],
            vec![("cache-control", "max-age=60, private")],
            vec![("cache-control", "no-store")],
            vec![("cache-control", "max-age=0")],
            vec![("cache-control", "max-age=60"), ("set-cookie", "a=1")],
            vec![("cache-control", "max-age=60"), ("vary", "*")],
        ] {
            assert_eq!(secs(&refused, false), None, "{refused:?}");
        }
        assert_eq!(secs(&[("cache-control", "max-age=60")], true), None);
        assert_eq!(secs(&[("cache-control", "public, max-age=60")], true), Some(60));
    }

    #[test]
    fn slices_cut_across_chunks() {
        let chunks: Vec<Bytes> = ["abc", "defg", "h"].iter().map(|c| Bytes::from_static(c.as_bytes())).collect();
        let joined = |s: Vec<Bytes>| s.iter().flat_map(|b| b.iter().copied()).map(char::from).collect::<String>();
        assert_eq!(joined(slices(&chunks, 0, 8)), "abcdefgh");
        assert_eq!(joined(slices(&chunks, 2, 5)), "cde");
        assert_eq!(joined(slices(&chunks, 7, 8)), "h");
        assert_eq!(joined(slices(&chunks, 3, 7)), "defg");
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 10))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 100))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 100))));
        assert_eq!(parse_range("bytes=-1000", 100), Ok(Some((0, 100))));
        assert_eq!(parse_range("bytes=50-1000", 100), Ok(Some((50, 100))));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=-0", 100), Err(()));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
        assert_eq!(parse_range("bytes=5-2", 100), Ok(None));
    }

    fn entry(size: u64) -> Entry {
        Entry {
            head: HeaderMap::new(),
            body: Stored::Memory(vec![Bytes::from(vec![0u8; size as usize])]),
            size,
            stored: Instant::now(),
            stored_at: SystemTime::now(),
            fresh_for: Duration::from_secs(60),
            vary: Vec::new(),
            public: false,
            stamp: AtomicU64::new(0),
        }
    }

    #[tokio::test]
    async fn stores_are_bounded_and_evict_the_least_recently_used() {
        let budget = Arc::new(Budget { max: 1000, used: AtomicU64::new(0) });
        let store = Arc::new(Store::new(budget.clone()));
        store.set_limits(100, 60);
        store.insert("/a".into(), entry(40));
        store.insert("/b".into(), entry(40));
        assert!(matches!(store.lookup("/a", &HeaderMap::new()), Lookup::Hit(_)), "a is used again");
        store.insert("/c".into(), entry(40));
        assert_eq!(store.used(), (2, 80));
        assert!(matches!(store.lookup("/a", &HeaderMap::new()), Lookup::Hit(_)));
        assert!(!matches!(store.lookup("/b", &HeaderMap::new()), Lookup::Hit(_)), "b was the oldest");
        store.insert("/big".into(), entry(61));
        assert_eq!(store.used(), (2, 80), "an object over max_object_bytes is not kept");
        assert_eq!(store.purge(None), 2);
        assert_eq!(store.used(), (0, 0));
        assert_eq!(budget.used.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn all_stores_together_stay_within_the_engine_budget() {
        let budget = Arc::new(Budget { max: 100, used: AtomicU64::new(0) });
        let (a, b) = (Arc::new(Store::new(budget.clone())), Arc::new(Store::new(budget.clone())));
        // A tenant asking for far more than the engine allows.
        a.set_limits(1 << 40, 1 << 30);
        b.set_limits(1 << 40, 1 << 30);
        a.insert("/1".into(), entry(60));
        b.insert("/1".into(), entry(30));
        assert!(b.insert("/2".into(), entry(30)).is_some(), "b makes room from its own");
        assert_eq!(b.used(), (1, 30));
        assert!(a.insert("/2".into(), entry(50)).is_some(), "a evicts its own oldest");
        assert_eq!(a.used(), (1, 50));
        assert!(b.insert("/3".into(), entry(80)).is_none(), "never past the budget");
        assert!(budget.used.load(Ordering::Relaxed) <= 100);
    }
}
