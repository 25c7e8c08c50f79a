package relay

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"image"
	"image/png"
	"io"
	"math/rand/v2"
	"mime"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"go.uber.org/zap/zaptest"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/dispatch"
)

// These tests need a real S3-compatible server: `source
// scripts/services/s3.sh; start_s3` starts one and exports
// COMFYUME_TEST_S3_{ENDPOINT,ACCESS_KEY,SECRET_KEY,BUCKET}. Without them the
// tests skip, except under CI, where they fail.
func s3TestOptions(t *testing.T) S3Options {
	t.Helper()
	o := S3Options{
		Endpoint:  os.Getenv("COMFYUME_TEST_S3_ENDPOINT"),
		AccessKey: os.Getenv("COMFYUME_TEST_S3_ACCESS_KEY"),
		SecretKey: os.Getenv("COMFYUME_TEST_S3_SECRET_KEY"),
		Bucket:    os.Getenv("COMFYUME_TEST_S3_BUCKET"),
		// A prefix of its own for every test: runs and tests never collide.
		Prefix: fmt.Sprintf("test-%d-%08x/", time.Now().UnixNano(), rand.Uint32()),
	}
	if o.Endpoint == "" || o.AccessKey == "" || o.SecretKey == "" || o.Bucket == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("COMFYUME_TEST_S3_* are not set: CI must start an S3 server (scripts/services/s3.sh, start_s3)")
		}
		t.Skip("COMFYUME_TEST_S3_* not set; run `source scripts/services/s3.sh; start_s3` first")
	}
	return o
}

func s3TestBlobs(t *testing.T, o S3Options) *S3Blobs {
	t.Helper()
	ctx := context.Background()
	s, err := NewS3Blobs(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.EnsureBucket(ctx); err != nil {
		t.Fatalf("bucket %s at %s: %v", o.Bucket, o.Endpoint, err)
	}
	t.Cleanup(func() {
		for obj := range s.client.ListObjects(ctx, o.Bucket, minio.ListObjectsOptions{Prefix: s.prefix, Recursive: true}) {
			if obj.Err == nil {
				_ = s.client.RemoveObject(ctx, o.Bucket, obj.Key, minio.RemoveObjectOptions{})
			}
		}
	})
	return s
}

// s3Gen is n reproducible pseudo-random bytes, made as they are read.
func s3Gen(seed uint64, n int64) io.Reader {
	var key [32]byte
	key[0] = byte(seed)
	key[1] = byte(seed >> 8)
	return io.LimitReader(rand.NewChaCha8(key), n)
}

func s3GenBytes(seed uint64, off, n int64) []byte {
	r := s3Gen(seed, off+n)
	if _, err := io.CopyN(io.Discard, r, off); err != nil {
		panic(err)
	}
	b, _ := io.ReadAll(r)
	return b
}

func s3Sum(t *testing.T, r io.Reader) ([32]byte, int64) {
	t.Helper()
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err != nil {
		t.Fatal(err)
	}
	return [32]byte(h.Sum(nil)), n
}

// memSampler passes reads through and records the largest live heap seen
// every `every` bytes (after a GC, so garbage does not count).
type memSampler struct {
	r           io.Reader
	every, next int64
	read        int64
	peak        uint64
}

func (m *memSampler) Read(p []byte) (int, error) {
	n, err := m.r.Read(p)
	m.read += int64(n)
	if m.read >= m.next {
		m.next += m.every
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		m.peak = max(m.peak, ms.HeapAlloc)
	}
	return n, err
}

func liveHeap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// rawGet fetches a key through a presigned URL with a plain HTTP client:
// what a browser gets.
func rawGet(t *testing.T, s *S3Blobs, key string) (*http.Response, []byte) {
	t.Helper()
	u, err := s.PresignGet(context.Background(), key, "", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(u.String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %s", key, resp.Status, body)
	}
	return resp, body
}

func noAWSChunked(t *testing.T, resp *http.Response) {
	t.Helper()
	if ce := resp.Header.Get("Content-Encoding"); strings.Contains(ce, "aws-chunked") {
		t.Errorf("object served with Content-Encoding %q: the upload used the streaming signature", ce)
	}
}

func TestS3BlobsStreamedLargePut(t *testing.T) {
	s := s3TestBlobs(t, s3TestOptions(t))
	ctx := context.Background()
	const size = 40<<20 + 123 // three parts, the last short
	key := "job1/output/video/big.mp4"

	base := liveHeap()
	src := &memSampler{r: s3Gen(1, size), every: 4 << 20}
	start := time.Now()
	if err := s.Put(ctx, key, src, BlobInfo{ContentType: "video/mp4"}); err != nil {
		t.Fatal(err)
	}
	growth := int64(src.peak) - int64(base)
	t.Logf("streamed %d MiB in %v; live heap grew by at most %.1f MiB (part size %d MiB)",
		size>>20, time.Since(start).Round(time.Millisecond), float64(growth)/(1<<20), s.partSize>>20)
	if src.read != size {
		t.Fatalf("Put read %d bytes of %d", src.read, size)
	}
	if limit := s.partSize + 4<<20; growth > limit || growth > size/2 {
		t.Errorf("live heap grew by %d bytes while streaming %d: Put buffers more than one part", growth, size)
	}

	b, err := s.Open(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	info := b.Info()
	if info.Size != size || info.ContentType != "video/mp4" || time.Since(info.ModTime) > time.Hour {
		t.Errorf("info = %+v", info)
	}
	got, n := s3Sum(t, b)
	want, _ := s3Sum(t, s3Gen(1, size))
	b.Close()
	if n != size || got != want {
		t.Fatalf("read back %d bytes, sha256 match %v", n, got == want)
	}

	// Range requests through http.ServeContent, as /view serves them: one
	// across the first part boundary, one suffix range.
	for _, tc := range []struct {
		rng      string
		off, len int64
	}{
		{"bytes=16777200-16777299", 16777200, 100},
		{"bytes=-1000", size - 1000, 1000},
	} {
		b, err := s.Open(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		req := httptest.NewRequest(http.MethodGet, "/view?filename=big.mp4", nil)
		req.Header.Set("Range", tc.rng)
		http.ServeContent(rec, req, "big.mp4", b.Info().ModTime, b)
		b.Close()
		wantCR := fmt.Sprintf("bytes %d-%d/%d", tc.off, tc.off+tc.len-1, size)
		if rec.Code != http.StatusPartialContent || rec.Header().Get("Content-Range") != wantCR {
			t.Fatalf("%s: %d %q, want 206 %q", tc.rng, rec.Code, rec.Header().Get("Content-Range"), wantCR)
		}
		if !bytes.Equal(rec.Body.Bytes(), s3GenBytes(1, tc.off, tc.len)) {
			t.Errorf("%s: wrong bytes", tc.rng)
		}
	}

	resp, _ := rawGet(t, s, key)
	noAWSChunked(t, resp)
	if resp.ContentLength != size {
		t.Errorf("raw GET Content-Length %d", resp.ContentLength)
	}
}

func TestS3BlobsSmallFiles(t *testing.T) {
	s := s3TestBlobs(t, s3TestOptions(t))
	ctx := context.Background()
	data := s3GenBytes(2, 0, 300<<10)

	// Unknown length (a response body), known length (a spooled file), and
	// an empty file.
	cases := []struct {
		key, ct string
		r       io.Reader
		info    BlobInfo
		want    []byte
	}{
		{"j/output/a.png", "image/png", io.NopCloser(bytes.NewReader(data)), BlobInfo{ContentType: "image/png"}, data},
		{"j/output/sub/b.webp", "image/webp", bytes.NewReader(data), BlobInfo{ContentType: "image/webp", Size: int64(len(data))}, data},
		{"j/output/empty.txt", "text/plain; charset=utf-8", strings.NewReader(""), BlobInfo{}, nil},
	}
	for _, c := range cases {
		if err := s.Put(ctx, c.key, c.r, c.info); err != nil {
			t.Fatalf("%s: %v", c.key, err)
		}
		b, err := s.Open(ctx, c.key)
		if err != nil {
			t.Fatalf("%s: %v", c.key, err)
		}
		got, err := io.ReadAll(b)
		b.Close()
		if err != nil || !bytes.Equal(got, c.want) {
			t.Errorf("%s: read %d bytes, err %v", c.key, len(got), err)
		}
		if b.Info().ContentType != c.ct || b.Info().Size != int64(len(c.want)) {
			t.Errorf("%s: info %+v, want type %s", c.key, b.Info(), c.ct)
		}
		resp, body := rawGet(t, s, c.key)
		noAWSChunked(t, resp)
		if resp.Header.Get("Content-Type") != c.ct || !bytes.Equal(body, c.want) {
			t.Errorf("%s: raw GET %s, %d bytes", c.key, resp.Header.Get("Content-Type"), len(body))
		}
	}

	// Range on a single-PUT object.
	b, err := s.Open(ctx, "j/output/a.png")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, "/view", nil)
	req.Header.Set("Range", "bytes=1000-1999")
	http.ServeContent(rec, req, "a.png", b.Info().ModTime, b)
	if rec.Code != http.StatusPartialContent || !bytes.Equal(rec.Body.Bytes(), data[1000:2000]) {
		t.Errorf("range: %d, %d bytes", rec.Code, rec.Body.Len())
	}
	if rec.Header().Get("Content-Type") != "image/png" {
		t.Errorf("range content type %q", rec.Header().Get("Content-Type"))
	}

	// The key travels as metadata.
	st, err := s.client.StatObject(ctx, s.opts.Bucket, s.prefix+"j/output/a.png", minio.StatObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if st.UserMetadata["Comfyume-Key"] != "j/output/a.png" {
		t.Errorf("metadata %v", st.UserMetadata)
	}
}

func TestS3BlobsMissing(t *testing.T) {
	s := s3TestBlobs(t, s3TestOptions(t))
	for _, key := range []string{"nope/output/x.png", "../x.png", ""} {
		if _, err := s.Open(context.Background(), key); !errors.Is(err, ErrBlobNotFound) {
			t.Errorf("Open(%q) = %v, want ErrBlobNotFound", key, err)
		}
	}
}

func TestS3BlobsPresign(t *testing.T) {
	o := s3TestOptions(t)
	// Sign for another name of the same server, as a public endpoint would
	// be: the URL must carry that host and its signature must hold there.
	host, port, err := net.SplitHostPort(o.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	public := "localhost"
	if host == "localhost" {
		public = "127.0.0.1"
	}
	o.PublicEndpoint = net.JoinHostPort(public, port)
	s := s3TestBlobs(t, o)
	ctx := context.Background()
	data := s3GenBytes(3, 0, 5000)
	if err := s.Put(ctx, "j/output/p.png", bytes.NewReader(data), BlobInfo{ContentType: "image/png"}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"ComfyUI_00001_.png", `my "cat" pic.png`, "café ☕.png"} {
		u, err := s.PresignGet(ctx, "j/output/p.png", name, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if u.Host != o.PublicEndpoint {
			t.Errorf("presigned for %s, want %s", u.Host, o.PublicEndpoint)
		}
		resp, err := http.Get(u.String())
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) {
			t.Fatalf("%s: %s, %d bytes: %.300s", name, resp.Status, len(body), body)
		}
		cd := resp.Header.Get("Content-Disposition")
		if _, params, err := mime.ParseMediaType(cd); err != nil || params["filename"] != name {
			t.Errorf("Content-Disposition %q, want filename %q (%v)", cd, name, err)
		}
		noAWSChunked(t, resp)
	}
	// Active content never comes back under its own type.
	if err := s.Put(ctx, "j/output/x.svg", strings.NewReader("<svg/>"), BlobInfo{ContentType: "image/svg+xml"}); err != nil {
		t.Fatal(err)
	}
	u, err := s.PresignGet(ctx, "j/output/x.svg", "x.svg", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(u.String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "application/octet-stream" {
		t.Errorf("svg served as %q", ct)
	}
}

// TestS3ViewRedirect: with RedirectExpiry, /view answers the owner with 302
// to a working presigned URL, and still serves transformations itself.
func TestS3ViewRedirect(t *testing.T) {
	s := s3TestBlobs(t, s3TestOptions(t))
	ctx := context.Background()
	store := dispatch.NewMemoryStore()
	g, err := New(Config{Blobs: s, Store: store, RedirectExpiry: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	jobID := "6a1f5b7e-0c9d-4e2b-8f3a-2d4c6e8f0a1b"
	if err := store.Save(ctx, &dispatch.Job{ID: jobID, User: "alice", Status: "success"}); err != nil {
		t.Fatal(err)
	}
	var img bytes.Buffer
	if err := png.Encode(&img, image.NewRGBA(image.Rect(0, 0, 8, 8))); err != nil {
		t.Fatal(err)
	}
	ref := capturedRef(jobID, comfy.FileRef{Filename: "ComfyUI_00001_.png", Type: "output"})
	key, _, _ := blobKey(ref)
	if err := s.Put(ctx, key, bytes.NewReader(img.Bytes()), BlobInfo{ContentType: "image/png"}); err != nil {
		t.Fatal(err)
	}
	view := func(user, extra string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest(http.MethodGet, "/api/view?filename=ComfyUI_00001_.png&type=output&subfolder="+ref.Subfolder+extra, nil)
		if !g.serveView(rec, req, Site{User: user}) {
			t.Fatal("serveView declined a captured output")
		}
		return rec
	}

	rec := view("alice", "")
	loc := rec.Header().Get("Location")
	if rec.Code != http.StatusFound || loc == "" {
		t.Fatalf("owner: %d, Location %q", rec.Code, loc)
	}
	resp, err := http.Get(loc)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, img.Bytes()) || !strings.Contains(resp.Header.Get("Content-Disposition"), "ComfyUI_00001_.png") {
		t.Errorf("following the redirect: %s, %d bytes, Content-Disposition %q", resp.Status, len(body), resp.Header.Get("Content-Disposition"))
	}

	head := httptest.NewRecorder()
	g.serveView(head, httptest.NewRequest(http.MethodHead, "/api/view?filename=ComfyUI_00001_.png&type=output&subfolder="+ref.Subfolder, nil), Site{User: "alice"})
	if head.Code != http.StatusOK || head.Header().Get("Content-Length") != fmt.Sprint(img.Len()) {
		t.Errorf("HEAD: %d, Content-Length %q; want 200 served by the gateway", head.Code, head.Header().Get("Content-Length"))
	}
	if rec := view("mallory", ""); rec.Code != http.StatusNotFound {
		t.Errorf("another user: %d, want 404", rec.Code)
	}
	if rec := view("alice", "&preview=jpeg%3B50"); rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "image/jpeg" {
		t.Errorf("preview=jpeg: %d %s, want 200 image/jpeg served by the gateway", rec.Code, rec.Header().Get("Content-Type"))
	}
	if rec := view("alice", "&channel=a"); rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "image/png" {
		t.Errorf("channel=a: %d %s, want 200 image/png served by the gateway", rec.Code, rec.Header().Get("Content-Type"))
	}
}

// flakyBlobs is a primary that fails every Put (after reading part of the
// file, as a connection dropped mid-upload would) until switched up.
type flakyBlobs struct {
	Blobs
	up atomic.Bool
}

func (f *flakyBlobs) Put(ctx context.Context, key string, r io.Reader, info BlobInfo) error {
	if !f.up.Load() {
		_, _ = io.CopyN(io.Discard, r, 1000)
		return errors.New("primary is down")
	}
	return f.Blobs.Put(ctx, key, r, info)
}

func (f *flakyBlobs) PresignGet(ctx context.Context, key, filename string, expiry time.Duration) (*url.URL, error) {
	if p, ok := f.Blobs.(Presigner); ok {
		return p.PresignGet(ctx, key, filename, expiry)
	}
	return nil, ErrPresignUnavailable
}

func waitPending(t *testing.T, s *Spool, want int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for s.Pending() != want {
		if time.Now().After(deadline) {
			t.Fatalf("Pending() = %d after %v, want %d", s.Pending(), within, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func readBlob(t *testing.T, b Blobs, key string) ([]byte, BlobInfo) {
	t.Helper()
	r, err := b.Open(context.Background(), key)
	if err != nil {
		t.Fatalf("Open(%s): %v", key, err)
	}
	defer r.Close()
	data, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return data, r.Info()
}

func TestSpoolWhilePrimaryDown(t *testing.T) {
	s3 := s3TestBlobs(t, s3TestOptions(t))
	ctx := context.Background()
	primary := &flakyBlobs{Blobs: s3}
	dir := t.TempDir()
	sp, err := newSpool(primary, dir, zaptest.NewLogger(t), 10*time.Millisecond, 100*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()

	data := s3GenBytes(4, 0, 200<<10)
	keys := []string{"j/output/one.png", "j/output/sub/two.png"}
	for _, key := range keys {
		if err := sp.Put(ctx, key, bytes.NewReader(data), BlobInfo{ContentType: "image/png"}); err != nil {
			t.Fatalf("Put with the primary down: %v", err)
		}
	}
	if n := sp.Pending(); n != 2 {
		t.Fatalf("Pending() = %d, want 2", n)
	}
	got, info := readBlob(t, sp, keys[0])
	if !bytes.Equal(got, data) || info.ContentType != "image/png" {
		t.Errorf("from the spool: %d bytes, %+v", len(got), info)
	}
	if _, err := s3.Open(ctx, keys[0]); !errors.Is(err, ErrBlobNotFound) {
		t.Errorf("in S3 already? %v", err)
	}
	if _, err := sp.PresignGet(ctx, keys[0], "one.png", time.Minute); !errors.Is(err, ErrPresignUnavailable) {
		t.Errorf("PresignGet of a spooled key: %v, want ErrPresignUnavailable", err)
	}
	time.Sleep(50 * time.Millisecond) // a few failed rounds
	if n := sp.Pending(); n != 2 {
		t.Fatalf("Pending() = %d while down, want 2", n)
	}

	primary.up.Store(true)
	waitPending(t, sp, 0, 10*time.Second)
	for _, key := range keys {
		got, info := readBlob(t, s3, key)
		if !bytes.Equal(got, data) || info.ContentType != "image/png" {
			t.Errorf("%s in S3: %d bytes, %+v", key, len(got), info)
		}
		got, _ = readBlob(t, sp, key) // now from the primary
		if !bytes.Equal(got, data) {
			t.Errorf("%s through the spool after upload: %d bytes", key, len(got))
		}
	}
	if _, err := sp.PresignGet(ctx, keys[0], "one.png", time.Minute); err != nil {
		t.Errorf("PresignGet after upload: %v", err)
	}
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			t.Errorf("left in the spool: %s", p)
		}
		return nil
	})

	// With the primary up, Put goes straight through.
	if err := sp.Put(ctx, "j/output/three.png", bytes.NewReader(data), BlobInfo{ContentType: "image/png"}); err != nil {
		t.Fatal(err)
	}
	if n := sp.Pending(); n != 0 {
		t.Errorf("Pending() = %d after a Put with the primary up", n)
	}
	if got, _ := readBlob(t, s3, "j/output/three.png"); !bytes.Equal(got, data) {
		t.Errorf("three.png in S3: %d bytes", len(got))
	}
}

// TestSpoolUnreachableAndRestart: an S3 at a closed port fails every Put;
// the files wait in the spool, and a new Spool on the same directory with a
// working S3 uploads them.
func TestSpoolUnreachableAndRestart(t *testing.T) {
	o := s3TestOptions(t)
	s3 := s3TestBlobs(t, o)
	ctx := context.Background()

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	l.Close()
	dead, err := NewS3Blobs(ctx, S3Options{Endpoint: closed, Bucket: o.Bucket, Prefix: o.Prefix, AccessKey: o.AccessKey, SecretKey: o.SecretKey})
	if err != nil {
		t.Fatalf("NewS3Blobs must not fail because the service is down: %v", err)
	}

	dir := t.TempDir()
	sp, err := newSpool(dead, dir, zaptest.NewLogger(t), 10*time.Millisecond, 50*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	data := s3GenBytes(5, 0, 100<<10)
	start := time.Now()
	if err := sp.Put(ctx, "k/output/left.png", bytes.NewReader(data), BlobInfo{ContentType: "image/png"}); err != nil {
		t.Fatal(err)
	}
	t.Logf("Put with S3 unreachable returned in %v", time.Since(start).Round(time.Millisecond))
	if got, _ := readBlob(t, sp, "k/output/left.png"); !bytes.Equal(got, data) {
		t.Errorf("from the spool: %d bytes", len(got))
	}
	if err := sp.Close(); err != nil {
		t.Fatal(err)
	}
	if n := sp.Pending(); n != 1 {
		t.Fatalf("Pending() = %d, want 1", n)
	}

	sp2, err := newSpool(s3, dir, zaptest.NewLogger(t), 10*time.Millisecond, 50*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer sp2.Close()
	waitPending(t, sp2, 0, 10*time.Second)
	got, info := readBlob(t, s3, "k/output/left.png")
	if !bytes.Equal(got, data) || info.ContentType != "image/png" {
		t.Errorf("uploaded after restart: %d bytes, %+v", len(got), info)
	}
}

// TestS3StreamingSignatureCanary shows why Put disables minio-go's
// streaming signature: uploaded with minio-go's defaults over plain http,
// some servers (versitygw v1.8.0) keep "aws-chunked" as the object's
// Content-Encoding and send it to browsers. It only logs what this server
// does; the tests above assert that Put's objects are clean.
func TestS3StreamingSignatureCanary(t *testing.T) {
	s := s3TestBlobs(t, s3TestOptions(t))
	name := s.prefix + "canary.bin"
	if _, err := s.client.PutObject(context.Background(), s.opts.Bucket, name, strings.NewReader("hello"), 5,
		minio.PutObjectOptions{ContentType: "application/octet-stream"}); err != nil {
		t.Fatal(err)
	}
	resp, _ := rawGet(t, s, "canary.bin")
	t.Logf("minio-go defaults over http: GET answers Content-Encoding %q", resp.Header.Get("Content-Encoding"))
}

// TestSpoolLocalPrimary needs no S3 server: a directory is the primary.
// Many concurrent Puts while it is down all land, leftovers of an
// interrupted run are tidied or uploaded, and everything reaches the
// primary once it is up.
func TestSpoolLocalPrimary(t *testing.T) {
	ctx := context.Background()
	disk, err := NewDiskBlobs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	primary := &flakyBlobs{Blobs: disk}
	dir := t.TempDir()

	// Leftovers: a finished file with its metadata, a stale partial write and
	// metadata whose file is gone.
	if err := os.MkdirAll(filepath.Join(dir, "old/output"), 0o750); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "old/output/left.png"), []byte("left over"), 0o640)
	os.WriteFile(filepath.Join(dir, "old/output/left.png.meta.json"), []byte(`{"content_type":"image/png"}`), 0o640)
	stale := filepath.Join(dir, "old/output/.part-123")
	os.WriteFile(stale, []byte("partial"), 0o640)
	os.Chtimes(stale, time.Now().Add(-2*time.Hour), time.Now().Add(-2*time.Hour))
	os.WriteFile(filepath.Join(dir, "old/output/gone.png.meta.json"), []byte(`{}`), 0o640)

	sp, err := newSpool(primary, dir, zaptest.NewLogger(t), 5*time.Millisecond, 20*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer sp.Close()
	for _, p := range []string{stale, filepath.Join(dir, "old/output/gone.png.meta.json")} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s not tidied: %v", p, err)
		}
	}

	const n = 20
	errs := make(chan error, n)
	for i := range n {
		go func() {
			errs <- sp.Put(ctx, fmt.Sprintf("j/output/%02d.png", i), bytes.NewReader(s3GenBytes(uint64(i), 0, 10000)), BlobInfo{ContentType: "image/png"})
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := sp.Pending(); got != n+1 {
		t.Fatalf("Pending() = %d, want %d", got, n+1)
	}
	for i := range n {
		if got, _ := readBlob(t, sp, fmt.Sprintf("j/output/%02d.png", i)); !bytes.Equal(got, s3GenBytes(uint64(i), 0, 10000)) {
			t.Errorf("%02d.png from the spool: %d bytes", i, len(got))
		}
	}

	primary.up.Store(true)
	waitPending(t, sp, 0, 10*time.Second)
	for i := range n {
		if got, _ := readBlob(t, disk, fmt.Sprintf("j/output/%02d.png", i)); !bytes.Equal(got, s3GenBytes(uint64(i), 0, 10000)) {
			t.Errorf("%02d.png in the primary: %d bytes", i, len(got))
		}
	}
	if got, info := readBlob(t, disk, "old/output/left.png"); string(got) != "left over" || info.ContentType != "image/png" {
		t.Errorf("leftover in the primary: %q %+v", got, info)
	}
}
