package relay

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// What is stored on disk is read back with its content type: the one its
// name implies, or the one it was given when that differs — also after the
// same key was stored again with the other kind of type, in a folder that
// was removed in between, and in a directory that was removed whole.
func TestDiskBlobsPutOpen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "outputs")
	d, err := NewDiskBlobs(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	put := func(key, ct, content string) {
		t.Helper()
		if err := d.Put(ctx, key, struct{ io.Reader }{strings.NewReader(content)}, BlobInfo{ContentType: ct}); err != nil {
			t.Fatalf("put %s: %v", key, err)
		}
	}
	check := func(key, ct, content string) {
		t.Helper()
		data, info := readBlob(t, d, key)
		if string(data) != content || info.ContentType != ct || info.Size != int64(len(content)) || info.ModTime.IsZero() {
			t.Errorf("%s: %q %+v, want %q of type %s", key, data, info, content, ct)
		}
	}
	put("j1/output/a.png", "image/png", "png")
	put("j1/output/sub/dir/b.webp", "image/webp", "webp")
	put("j1/output/c.bin", "model/gltf-binary", "glb")
	put("j1/output/d.png", "", "untyped")
	check("j1/output/a.png", "image/png", "png")
	check("j1/output/sub/dir/b.webp", "image/webp", "webp")
	check("j1/output/c.bin", "model/gltf-binary", "glb")
	check("j1/output/d.png", "image/png", "untyped")

	// Stored again: the type given last, not the one before.
	put("j1/output/c.bin", "application/octet-stream", "again")
	check("j1/output/c.bin", "application/octet-stream", "again")
	put("j1/output/a.png", "text/plain", "text")
	check("j1/output/a.png", "text/plain", "text")
	// ... also when another job's file was stored in between.
	put("j0/output/z.png", "image/png", "other job")
	put("j1/output/a.png", "image/png", "png again")
	check("j1/output/a.png", "image/png", "png again")
	put("j0/output/z.png", "text/plain", "other job")
	put("j1/output/a.png", "text/plain", "text again")
	check("j1/output/a.png", "text/plain", "text again")

	if err := d.RemoveJob(ctx, "j1"); err != nil {
		t.Fatal(err)
	}
	put("j1/output/a.png", "image/png", "after removal")
	check("j1/output/a.png", "image/png", "after removal")
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	put("j2/temp/e.png", "image/png", "new directory")
	check("j2/temp/e.png", "image/png", "new directory")
}

// An output whose type its name implies is one file on disk, nothing beside
// it (an output is often a few kB: a second file doubled the inodes and
// writes per capture).
func TestDiskBlobsOneFilePerOutput(t *testing.T) {
	d, err := NewDiskBlobs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Put(context.Background(), "j/output/a.png", strings.NewReader("png"), BlobInfo{ContentType: "image/png"}); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(filepath.Join(d.Dir, "j", "output"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, []string{"a.png"}) {
		t.Errorf("files stored for one output: %q", names)
	}
}

// gateReader gives part of data, closes given, and waits for open before
// the rest.
type gateReader struct {
	data        []byte
	gave        bool
	given, open chan struct{}
}

func (g *gateReader) Read(p []byte) (int, error) {
	if len(g.data) == 0 {
		return 0, io.EOF
	}
	if g.gave {
		<-g.open
	}
	n := copy(p, g.data[:min(len(p), len(g.data)/2+1)])
	g.data = g.data[n:]
	if !g.gave {
		g.gave = true
		close(g.given)
	}
	return n, nil
}

// While a file is being stored, a reader sees nothing, or the file before;
// never part of the new one.
func TestDiskBlobsNoPartialFile(t *testing.T) {
	d, err := NewDiskBlobs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	old := bytes.Repeat([]byte("o"), 1000)
	if err := d.Put(ctx, "j/output/b.png", bytes.NewReader(old), BlobInfo{ContentType: "image/png"}); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("n"), 1<<20)
	for _, key := range []string{"j/output/a.png", "j/output/b.png", "k/output/c.png"} {
		g := &gateReader{data: data, given: make(chan struct{}), open: make(chan struct{})}
		done := make(chan error, 1)
		go func() { done <- d.Put(ctx, key, g, BlobInfo{ContentType: "image/png"}) }()
		<-g.given
		f, err := d.Open(ctx, key)
		switch {
		case key == "j/output/b.png":
			if err != nil {
				t.Fatalf("%s: the file before is gone while storing: %v", key, err)
			}
			got, _ := io.ReadAll(f)
			f.Close()
			if !bytes.Equal(got, old) {
				t.Errorf("%s: read %d bytes while storing, want the %d of the file before", key, len(got), len(old))
			}
		case !errors.Is(err, ErrBlobNotFound):
			if err == nil {
				f.Close()
			}
			t.Errorf("%s: opened while storing: %v", key, err)
		}
		close(g.open)
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if got, _ := readBlob(t, d, key); !bytes.Equal(got, data) {
			t.Errorf("%s: %d bytes stored, want %d", key, len(got), len(data))
		}
	}
}
