package relay

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Spool wraps a primary Blobs (S3) with a local directory, so that outputs
// still land while the primary is down.
//
// Put writes the file to the spool first (the source is a stream that can be
// read only once), then uploads it to the primary and removes it from the
// spool. When that upload fails, Put still succeeds: the file stays in the
// spool and a background loop uploads it later, retrying with backoff until
// it succeeds. Open serves a key from the spool while it is there, else from
// the primary. Files left in the directory by an earlier process are
// uploaded after start.
//
// One Spool per directory. Outputs in one replica's spool are not visible to
// other replicas until uploaded.
type Spool struct {
	primary Blobs
	disk    *DiskBlobs
	logger  *zap.Logger

	minBackoff, maxBackoff time.Duration

	mu      sync.Mutex
	pending map[string]struct{}
	locks   map[string]*keyLock

	wake   chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}
}

var (
	_ Blobs     = (*Spool)(nil)
	_ Presigner = (*Spool)(nil)
)

type keyLock struct {
	mu   sync.Mutex
	refs int
}

// NewSpool opens (creating it if needed) the spool directory, queues the
// files found there for upload and starts the upload loop. Close stops it.
func NewSpool(primary Blobs, dir string, logger *zap.Logger) (*Spool, error) {
	return newSpool(primary, dir, logger, time.Second, time.Minute)
}

func newSpool(primary Blobs, dir string, logger *zap.Logger, minBackoff, maxBackoff time.Duration) (*Spool, error) {
	if primary == nil {
		return nil, errors.New("relay: spool without a primary blob store")
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	disk, err := NewDiskBlobs(dir)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Spool{
		primary:    primary,
		disk:       disk,
		logger:     logger,
		minBackoff: minBackoff,
		maxBackoff: maxBackoff,
		pending:    map[string]struct{}{},
		locks:      map[string]*keyLock{},
		wake:       make(chan struct{}, 1),
		ctx:        ctx,
		cancel:     cancel,
		done:       make(chan struct{}),
	}
	if err := s.scan(); err != nil {
		cancel()
		return nil, err
	}
	if n := len(s.pending); n > 0 {
		logger.Info("spool holds outputs from before; uploading them", zap.String("dir", dir), zap.Int("files", n))
	}
	go s.loop()
	return s, nil
}

// scan queues the files left in the directory and tidies what an
// interrupted write or upload left: old partial files, metadata without its
// file, empty directories.
func (s *Spool) scan() error {
	var dirs []string
	err := filepath.WalkDir(s.disk.Dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if p != s.disk.Dir {
				dirs = append(dirs, p)
			}
			return nil
		}
		name := d.Name()
		switch {
		case strings.HasPrefix(name, ".part-"):
			// A write that never finished; recent ones may belong to a
			// process that is still writing (a config reload).
			if fi, err := d.Info(); err == nil && time.Since(fi.ModTime()) > time.Hour {
				os.Remove(p)
			}
		case strings.HasSuffix(name, ".meta.json"):
			if _, err := os.Stat(strings.TrimSuffix(p, ".meta.json")); errors.Is(err, fs.ErrNotExist) {
				os.Remove(p)
			}
		case d.Type().IsRegular():
			rel, err := filepath.Rel(s.disk.Dir, p)
			if err != nil {
				return err
			}
			s.pending[filepath.ToSlash(rel)] = struct{}{}
		}
		return nil
	})
	// Deepest first; only empty ones go.
	for i := len(dirs) - 1; i >= 0; i-- {
		os.Remove(dirs[i])
	}
	return err
}

// Close stops the upload loop (an upload in progress is cancelled and the
// file stays in the spool). Put and Open keep working without retries.
func (s *Spool) Close() error {
	s.cancel()
	<-s.done
	return nil
}

// Pending is the number of files waiting for upload.
func (s *Spool) Pending() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.pending)
}

// Put implements Blobs: the file lands in the spool, then goes to the
// primary. It fails only when the spool itself cannot take the file.
func (s *Spool) Put(ctx context.Context, key string, r io.Reader, info BlobInfo) error {
	unlock := s.lockKey(key)
	defer unlock()
	if err := s.disk.Put(ctx, key, r, info); err != nil {
		return err
	}
	s.mu.Lock()
	s.pending[key] = struct{}{}
	s.mu.Unlock()
	if err := s.upload(ctx, key); err != nil {
		s.logger.Warn("blob store unavailable; output kept in the spool for a later upload",
			zap.String("key", key), zap.Error(err))
		select {
		case s.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// upload copies a spooled key to the primary and drops it from the spool.
// The caller holds the key's lock.
func (s *Spool) upload(ctx context.Context, key string) error {
	b, err := s.disk.Open(ctx, key)
	if errors.Is(err, ErrBlobNotFound) {
		s.drop(key) // gone (uploaded by another process sharing the directory)
		return nil
	}
	if err != nil {
		return err
	}
	defer b.Close()
	info := b.Info()
	if info.ContentType == "" {
		info.ContentType = contentTypeOf(key)
	}
	if err := s.primary.Put(ctx, key, b, info); err != nil {
		return err
	}
	s.drop(key)
	return nil
}

// drop forgets a key and removes its files. Under s.mu, so that Open never
// sees a key as pending whose file is gone (an open file stays readable
// after removal).
func (s *Spool) drop(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pending, key)
	if p, err := s.disk.path(key); err == nil {
		os.Remove(p)
		os.Remove(p + ".meta.json")
	}
}

// Open implements Blobs.
func (s *Spool) Open(ctx context.Context, key string) (Blob, error) {
	s.mu.Lock()
	_, spooled := s.pending[key]
	var (
		b   Blob
		err error
	)
	if spooled {
		b, err = s.disk.Open(ctx, key)
	}
	s.mu.Unlock()
	if spooled && !errors.Is(err, ErrBlobNotFound) {
		return b, err
	}
	return s.primary.Open(ctx, key)
}

// RemoveJob implements Blobs: the job's files leave the spool (no upload
// follows) and the primary.
func (s *Spool) RemoveJob(ctx context.Context, job string) error {
	folder, err := jobFolder(job)
	if err != nil {
		return err
	}
	s.mu.Lock()
	for key := range s.pending {
		if strings.HasPrefix(key, folder) {
			delete(s.pending, key)
		}
	}
	s.mu.Unlock()
	if err := s.disk.RemoveJob(ctx, job); err != nil {
		return err
	}
	return s.primary.RemoveJob(ctx, job)
}

// PresignGet implements Presigner when the primary does, for keys that are
// not waiting in the spool.
func (s *Spool) PresignGet(ctx context.Context, key, filename string, expiry time.Duration) (*url.URL, error) {
	s.mu.Lock()
	_, spooled := s.pending[key]
	s.mu.Unlock()
	p, ok := s.primary.(Presigner)
	if spooled || !ok {
		return nil, ErrPresignUnavailable
	}
	return p.PresignGet(ctx, key, filename, expiry)
}

// lockKey serialises writes and uploads of one key.
func (s *Spool) lockKey(key string) (unlock func()) {
	s.mu.Lock()
	l := s.locks[key]
	if l == nil {
		l = &keyLock{}
		s.locks[key] = l
	}
	l.refs++
	s.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		s.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(s.locks, key)
		}
		s.mu.Unlock()
	}
}

// loop uploads pending keys. A round stops at the first failure (the
// primary is likely down) and waits, doubling the wait up to maxBackoff;
// the key that failed goes last in the next round, so one file the primary
// keeps refusing does not hold back the others.
func (s *Spool) loop() {
	defer close(s.done)
	backoff := s.minBackoff
	var last string // key that failed last round
	for {
		keys := s.pendingKeys(last)
		if len(keys) == 0 {
			backoff, last = s.minBackoff, ""
			select {
			case <-s.ctx.Done():
				return
			case <-s.wake:
			}
			// Put just failed to upload; give the primary a moment.
			if !s.sleep(s.minBackoff) {
				return
			}
			continue
		}
		failed := ""
		for _, key := range keys {
			if s.ctx.Err() != nil {
				return
			}
			if err := s.uploadPending(key); err != nil {
				log := s.logger.Debug
				if backoff == s.minBackoff { // first failure of a run of them
					log = s.logger.Warn
				}
				log("spool upload failed; will retry", zap.String("key", key),
					zap.Int("pending", s.Pending()), zap.Duration("retry_in", backoff), zap.Error(err))
				failed = key
				break
			}
		}
		if failed == "" {
			backoff, last = s.minBackoff, ""
			continue
		}
		last = failed
		if !s.sleep(backoff) {
			return
		}
		backoff = min(2*backoff, s.maxBackoff)
	}
}

func (s *Spool) uploadPending(key string) error {
	unlock := s.lockKey(key)
	defer unlock()
	s.mu.Lock()
	_, ok := s.pending[key]
	s.mu.Unlock()
	if !ok {
		return nil // Put uploaded it meanwhile
	}
	if err := s.upload(s.ctx, key); err != nil {
		return err
	}
	s.logger.Info("spooled output uploaded", zap.String("key", key))
	return nil
}

// pendingKeys lists the pending keys in order, the ones after last first.
func (s *Spool) pendingKeys(last string) []string {
	s.mu.Lock()
	keys := make([]string, 0, len(s.pending))
	for k := range s.pending {
		keys = append(keys, k)
	}
	s.mu.Unlock()
	sort.Strings(keys)
	if last != "" {
		i := sort.SearchStrings(keys, last)
		if i < len(keys) && keys[i] == last {
			i++
		}
		keys = slices.Concat(keys[i:], keys[:i])
	}
	return keys
}

// sleep waits d; false when the spool is closing.
func (s *Spool) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-s.ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
