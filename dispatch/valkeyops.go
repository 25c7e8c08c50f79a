package dispatch

import (
	"context"
	"encoding/json"
)

// failuresKey is the list of the latest failures, newest first:
//
//	<prefix>failures   list of Failure JSON, at most RecentFailures
func (s *ValkeyStore) failuresKey() string { return s.prefix + "failures" }

// AddFailure implements FailureLog: LPUSH, then LTRIM to RecentFailures.
func (s *ValkeyStore) AddFailure(ctx context.Context, f Failure) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	b, err := json.Marshal(f)
	if err != nil {
		return err
	}
	k := s.failuresKey()
	for _, r := range s.client.DoMulti(ctx,
		s.client.B().Lpush().Key(k).Element(string(b)).Build(),
		s.client.B().Ltrim().Key(k).Start(0).Stop(RecentFailures-1).Build()) {
		if err := r.Error(); err != nil {
			return s.wrap("record failure", err)
		}
	}
	return nil
}

// Failures implements FailureLog.
func (s *ValkeyStore) Failures(ctx context.Context, n int) ([]Failure, error) {
	if n <= 0 {
		return nil, nil
	}
	ctx, cancel := s.bound(ctx)
	defer cancel()
	items, err := s.client.Do(ctx, s.client.B().Lrange().Key(s.failuresKey()).Start(0).Stop(int64(n-1)).Build()).AsStrSlice()
	if err != nil {
		return nil, s.wrap("read failures", err)
	}
	out := make([]Failure, 0, len(items))
	for _, it := range items {
		var f Failure
		if json.Unmarshal([]byte(it), &f) == nil {
			out = append(out, f)
		}
	}
	return out, nil
}

var _ FailureLog = (*ValkeyStore)(nil)
