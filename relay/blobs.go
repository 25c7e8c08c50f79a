package relay

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/comfyume/comfyume/comfy"
)

// BlobInfo describes a stored output file.
type BlobInfo struct {
	ContentType string    `json:"content_type"`
	Size        int64     `json:"size"`
	ModTime     time.Time `json:"mod_time"`
}

// Blob is an open stored file.
type Blob interface {
	io.ReadSeekCloser
	Info() BlobInfo
}

// Blobs stores captured outputs by key. Keys are slash-separated relative
// paths made by the gateway (never by a browser).
type Blobs interface {
	Put(ctx context.Context, key string, r io.Reader, info BlobInfo) error
	Open(ctx context.Context, key string) (Blob, error)
	// RemoveJob removes every file stored under a job's folder (keys
	// "<job>/..."); a job with no files is no error.
	RemoveJob(ctx context.Context, job string) error
}

// jobFolder checks a job id used as a folder: one plain name.
func jobFolder(job string) (string, error) {
	if err := comfy.CheckName(job); err != nil {
		return "", err
	}
	return job + "/", nil
}

// ErrBlobNotFound is returned by Open for a missing key.
var ErrBlobNotFound = errors.New("blob not found")

// DiskBlobs keeps outputs as files under a directory.
type DiskBlobs struct {
	Dir string

	// lastDir is the folder of the last file stored: a Put into any
	// other folder, most often a new job's, makes it first.
	lastDir atomic.Pointer[string]
}

// NewDiskBlobs creates the directory if needed.
func NewDiskBlobs(dir string) (*DiskBlobs, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}
	return &DiskBlobs{Dir: dir}, nil
}

func (d *DiskBlobs) path(key string) (string, error) {
	clean := filepath.Clean("/" + key)
	if clean == "/" || strings.Contains(key, "\x00") || strings.Contains(key, "..") {
		return "", ErrBlobNotFound
	}
	return filepath.Join(d.Dir, filepath.FromSlash(clean)), nil
}

// Put writes the file atomically: into a temporary file in its folder,
// renamed to its name once complete, so that a reader sees the whole file or
// none. The info is kept beside it (key.meta.json) only when Open could not
// tell it from the file: a content type other than the one its name implies
// (contentTypeOf), or a given ModTime.
func (d *DiskBlobs) Put(_ context.Context, key string, r io.Reader, info BlobInfo) error {
	p, err := d.path(key)
	if err != nil {
		return err
	}
	dir := filepath.Dir(p)
	// made: this Put made the file's folder, so no earlier file of the
	// key left anything in it.
	made := false
	if last := d.lastDir.Load(); last == nil || *last != dir {
		// Another folder than the last file's: most often a new job's.
		// Making it (or finding it there) costs what a create failing in
		// a missing folder would.
		if made, err = d.mkdirs(dir); err != nil {
			return err
		}
	}
	tmp, err := os.CreateTemp(dir, ".part-*")
	if errors.Is(err, fs.ErrNotExist) {
		// The last file's folder, removed since (its job was forgotten).
		if made, err = d.mkdirs(dir); err == nil {
			tmp, err = os.CreateTemp(dir, ".part-*")
		}
	}
	if err != nil {
		return err
	}
	d.lastDir.Store(&dir)
	n, err := copyToFile(tmp, r)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		info.Size = n
		err = d.putInfo(p, key, info, made)
	}
	if err == nil {
		err = renameFile(tmp.Name(), p)
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}

// putInfo writes the info file of the file p (key) about to be renamed into
// place, or removes the one an earlier file of that key left when it is not
// needed (unless the folder is new: made).
func (d *DiskBlobs) putInfo(p, key string, info BlobInfo, made bool) error {
	meta := p + ".meta.json"
	if info.ModTime.IsZero() && (info.ContentType == "" || info.ContentType == contentTypeOf(key)) {
		if made {
			return nil
		}
		if err := removeFile(meta); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return nil
	}
	if info.ModTime.IsZero() {
		info.ModTime = time.Now()
	}
	b, _ := json.Marshal(info)
	return os.WriteFile(meta, b, 0o640)
}

// mkdirs makes the folder dir of a key and the missing ones above it, from
// d.Dir down: a key has few levels ("<job>/<type>/[<subfolder>/]"), each
// one mkdir (made, or there already). When d.Dir itself is gone, MkdirAll
// makes the whole path. made says whether dir itself was made here.
func (d *DiskBlobs) mkdirs(dir string) (made bool, err error) {
	rel, err := filepath.Rel(d.Dir, dir)
	if err != nil || rel == "." || strings.HasPrefix(rel, "..") {
		return false, os.MkdirAll(dir, 0o750)
	}
	at := filepath.Clean(d.Dir)
	for _, name := range strings.Split(rel, string(filepath.Separator)) {
		at = filepath.Join(at, name)
		err := os.Mkdir(at, 0o750)
		if errors.Is(err, fs.ErrNotExist) {
			return false, os.MkdirAll(dir, 0o750)
		}
		if err != nil && !errors.Is(err, fs.ErrExist) {
			return false, err
		}
		made = err == nil
	}
	return made, nil
}

// copyBufs are the buffers copyToFile reads a stream into: large enough for
// a file to go in a few reads and writes (an image with its workflow is a
// megabyte), and reused, not made per file.
var copyBufs = sync.Pool{New: func() any {
	b := make([]byte, 256<<10)
	return &b
}}

// copyToFile copies r into f through a pooled buffer.
func copyToFile(f *os.File, r io.Reader) (int64, error) {
	bp := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(bp)
	// The wrapper hides f's ReadFrom, which would copy through a new 32 KiB
	// buffer of its own.
	return io.CopyBuffer(struct{ io.Writer }{f}, r, *bp)
}

type diskBlob struct {
	*os.File
	info BlobInfo
}

func (b diskBlob) Info() BlobInfo { return b.info }

// Open implements Blobs.
func (d *DiskBlobs) Open(_ context.Context, key string) (Blob, error) {
	p, err := d.path(key)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrBlobNotFound
	}
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil || st.IsDir() {
		f.Close()
		return nil, ErrBlobNotFound
	}
	var info BlobInfo
	if meta, err := os.ReadFile(p + ".meta.json"); err == nil {
		_ = json.Unmarshal(meta, &info)
	}
	info.Size = st.Size()
	if info.ContentType == "" {
		info.ContentType = contentTypeOf(key)
	}
	if info.ModTime.IsZero() {
		info.ModTime = st.ModTime()
	}
	return diskBlob{File: f, info: info}, nil
}

// RemoveJob implements Blobs.
func (d *DiskBlobs) RemoveJob(_ context.Context, job string) error {
	if _, err := jobFolder(job); err != nil {
		return err
	}
	return os.RemoveAll(filepath.Join(d.Dir, job))
}
