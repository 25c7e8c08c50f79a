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

// Put writes the file atomically (temp file + rename) with its info beside it.
func (d *DiskBlobs) Put(_ context.Context, key string, r io.Reader, info BlobInfo) error {
	p, err := d.path(key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(p), ".part-*")
	if err != nil {
		return err
	}
	n, err := io.Copy(tmp, r)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp.Name())
		return err
	}
	info.Size = n
	if info.ModTime.IsZero() {
		info.ModTime = time.Now()
	}
	meta, _ := json.Marshal(info)
	if err := os.WriteFile(p+".meta.json", meta, 0o640); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	return os.Rename(tmp.Name(), p)
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
