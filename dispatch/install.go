package dispatch

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"

	"github.com/valkey-io/valkey-go"
	"go.uber.org/zap"
)

// A pool's last known install (the node classes of its /object_info and
// the values of their COMBO inputs: model files and the like) is kept in
// the store, so that a prompt needing a node or model the pool lacks is
// refused at once while no endpoint of the pool is up — after a restart,
// and on every replica sharing the store, not only on the gateway that saw
// the pool warm. A pool never seen warm is not checked.

// Bounds of what a GPU server's /object_info may cost (it is semi-trusted:
// its answer is read within a limit, and what is kept of it is bounded).
const (
	// MaxObjectInfo is the largest /object_info read from an endpoint
	// (real installs with many custom nodes answer tens of MiB).
	MaxObjectInfo = 64 << 20
	// MaxStoredInstall bounds the install kept in the store per pool: the
	// class names and COMBO values, each distinct list once. A larger one
	// is not kept (the pool is then not checked while it is cold).
	MaxStoredInstall = 4 << 20
)

// InstallStore is implemented by stores that keep each pool's last known
// install (both the memory and the Valkey store).
type InstallStore interface {
	// SaveInstall replaces the pool's install (at most MaxStoredInstall
	// bytes, in the format of encodeInstall).
	SaveInstall(ctx context.Context, pool string, b []byte) error
	// Install returns it, or ErrNotFound.
	Install(ctx context.Context, pool string) ([]byte, error)
}

// fetchObjectInfo reads an endpoint's node classes and their COMBO inputs,
// reading at most MaxObjectInfo bytes.
func fetchObjectInfo(ctx context.Context, u *Upstream) (map[string]classInfo, error) {
	req, err := u.NewRequest(ctx, http.MethodGet, "/object_info", nil)
	if err != nil {
		return nil, err
	}
	resp, err := u.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, &HTTPError{Status: resp.StatusCode, Body: b}
	}
	return parseObjectInfo(resp.Body)
}

// parseObjectInfo reads an /object_info answer (at most MaxObjectInfo
// bytes of it): the node classes and their COMBO inputs.
func parseObjectInfo(r io.Reader) (map[string]classInfo, error) {
	lr := &io.LimitedReader{R: r, N: MaxObjectInfo + 1}
	var raw map[string]struct {
		Input map[string]map[string]json.RawMessage `json:"input"`
	}
	if err := json.NewDecoder(lr).Decode(&raw); err != nil {
		if lr.N <= 0 {
			return nil, fmt.Errorf("/object_info is larger than %d MiB", MaxObjectInfo>>20)
		}
		return nil, fmt.Errorf("reading /object_info: %w", err)
	}
	classes := make(map[string]classInfo, len(raw))
	for name, def := range raw {
		ci := classInfo{combos: map[string]combo{}}
		for _, group := range def.Input {
			for in, spec := range group {
				if opts, ok := comboOptions(spec); ok {
					ci.combos[in] = newCombo(opts)
				}
			}
		}
		classes[name] = ci
	}
	return classes, nil
}

// storedInstall is an install as the store keeps it: each distinct COMBO
// list once (a checkpoint folder appears in many loader nodes).
type storedInstall struct {
	Lists [][]string `json:"lists"`
	// Classes maps each node class to its COMBO inputs' list indexes.
	Classes map[string]map[string]int `json:"classes"`
}

var errInstallTooBig = errors.New("install too big to keep")

// encodeInstall encodes classes for the store, or fails with
// errInstallTooBig past MaxStoredInstall bytes.
func encodeInstall(classes map[string]classInfo) ([]byte, error) {
	si := storedInstall{Lists: [][]string{}, Classes: make(map[string]map[string]int, len(classes))}
	index := map[string]int{}
	size := 0
	for name, ci := range classes {
		inputs := make(map[string]int, len(ci.combos))
		for in, c := range ci.combos {
			key := listKey(c.list)
			i, ok := index[key]
			if !ok {
				i = len(si.Lists)
				index[key] = i
				si.Lists = append(si.Lists, c.list)
				size += len(key) + 4*len(c.list)
			}
			inputs[in] = i
			size += len(in) + 8
		}
		si.Classes[name] = inputs
		size += len(name) + 8
		if size > MaxStoredInstall {
			return nil, errInstallTooBig
		}
	}
	b, err := json.Marshal(si)
	if err != nil {
		return nil, err
	}
	if len(b) > MaxStoredInstall {
		return nil, errInstallTooBig
	}
	return b, nil
}

// listKey names a list of values unambiguously (each value with its
// length).
func listKey(list []string) string {
	var b strings.Builder
	for _, v := range list {
		b.WriteString(strconv.Itoa(len(v)))
		b.WriteByte(':')
		b.WriteString(v)
	}
	return b.String()
}

// decodeInstall reads what encodeInstall wrote.
func decodeInstall(b []byte) (map[string]classInfo, error) {
	if len(b) > MaxStoredInstall {
		return nil, errInstallTooBig
	}
	var si storedInstall
	if err := json.Unmarshal(b, &si); err != nil {
		return nil, err
	}
	combos := make([]combo, len(si.Lists))
	for i, l := range si.Lists {
		combos[i] = newCombo(l)
	}
	classes := make(map[string]classInfo, len(si.Classes))
	for name, inputs := range si.Classes {
		ci := classInfo{combos: make(map[string]combo, len(inputs))}
		for in, i := range inputs {
			if i < 0 || i >= len(combos) {
				return nil, fmt.Errorf("stored install: class %.100q names list %d of %d", name, i, len(combos))
			}
			ci.combos[in] = combos[i]
		}
		classes[name] = ci
	}
	return classes, nil
}

// keepInstall saves a pool's install just read from an endpoint in the
// store (in the background: a prompt does not wait for it).
func (c *prechecker) keepInstall(pool string, classes map[string]classInfo) {
	is := c.store
	if is == nil {
		return
	}
	b, err := encodeInstall(classes)
	if err != nil {
		c.logger.Warn("the pool's install is not kept for checking prompts while it is cold",
			zap.String("pool", pool), zap.Int("classes", len(classes)), zap.Int("limit", MaxStoredInstall), zap.Error(err))
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*objectInfoFetchTimeout)
		defer cancel()
		if err := is.SaveInstall(ctx, pool, b); err != nil {
			c.logger.Warn("keeping the pool's install", zap.String("pool", pool), zap.Error(err))
		}
	}()
}

// lastInstall reads a pool's install from the store (nil: none, or the
// store does not keep installs or cannot be read).
func (c *prechecker) lastInstall(ctx context.Context, pool string) map[string]classInfo {
	is := c.store
	if is == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, objectInfoFetchTimeout)
	defer cancel()
	b, err := is.Install(ctx, pool)
	if err != nil {
		if !errors.Is(err, ErrNotFound) {
			c.logger.Warn("reading the pool's last known install", zap.String("pool", pool), zap.Error(err))
		}
		return nil
	}
	classes, err := decodeInstall(b)
	if err != nil {
		c.logger.Warn("the pool's stored install is unreadable", zap.String("pool", pool), zap.Error(err))
		return nil
	}
	return classes
}

// installs is the memory store's part of InstallStore.
type installs struct {
	mu sync.Mutex
	m  map[string][]byte
}

func (s *installs) save(pool string, b []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string][]byte{}
	}
	s.m[pool] = append([]byte(nil), b...)
}

func (s *installs) get(pool string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.m[pool]
	if !ok {
		return nil, ErrNotFound
	}
	return b, nil
}

// SaveInstall implements InstallStore.
func (s *MemoryStore) SaveInstall(_ context.Context, pool string, b []byte) error {
	if len(b) > MaxStoredInstall {
		return errInstallTooBig
	}
	s.installs.save(pool, b)
	return nil
}

// Install implements InstallStore.
func (s *MemoryStore) Install(_ context.Context, pool string) ([]byte, error) {
	return s.installs.get(pool)
}

func (s *ValkeyStore) installKey(pool string) string { return s.prefix + "install:" + pool }

// SaveInstall implements InstallStore: one string per pool, without
// expiry (a restart forgets nothing).
func (s *ValkeyStore) SaveInstall(ctx context.Context, pool string, b []byte) error {
	if len(b) > MaxStoredInstall {
		return errInstallTooBig
	}
	ctx, cancel := s.bound(ctx)
	defer cancel()
	if err := s.client.Do(ctx, s.client.B().Set().Key(s.installKey(pool)).Value(string(b)).Build()).Error(); err != nil {
		return s.wrap("saving the install of pool "+pool, err)
	}
	return nil
}

// Install implements InstallStore.
func (s *ValkeyStore) Install(ctx context.Context, pool string) ([]byte, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	b, err := s.client.Do(ctx, s.client.B().Get().Key(s.installKey(pool)).Build()).AsBytes()
	if err != nil {
		if valkey.IsValkeyNil(err) {
			return nil, ErrNotFound
		}
		return nil, s.wrap("reading the install of pool "+pool, err)
	}
	return b, nil
}
