package usage

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/valkey-io/valkey-go"
)

// ValkeyLedger keeps usage in Valkey (or Redis 7), shared by every gateway
// replica: one hash per day, "<prefix>usage:<day>", whose fields are
// "<metric>|<pool>|<user>" counters changed with HINCRBY inside Lua
// scripts. Each hash expires Retention after its last change.
type ValkeyLedger struct {
	client valkey.Client
	prefix string
	// Timeout bounds each call (default 5s).
	Timeout time.Duration
	now     func() time.Time
}

// NewValkeyLedger returns a ledger under prefix (e.g. "comfyume:").
func NewValkeyLedger(client valkey.Client, prefix string) *ValkeyLedger {
	return &ValkeyLedger{client: client, prefix: prefix, Timeout: 5 * time.Second, now: time.Now}
}

func (l *ValkeyLedger) dayKey(day string) string { return l.prefix + "usage:" + day }

func (l *ValkeyLedger) ttl() string { return strconv.FormatInt(int64(Retention/time.Second), 10) }

func (l *ValkeyLedger) ctx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, l.Timeout)
}

// admitScript: KEYS[1] the day; ARGV suffix "|pool|user", GPU limit (ms),
// prompts limit, TTL (s). It applies verdict's rule and returns {kind
// (0 admitted, 1 GPU time, 2 prompts), used ms, admitted, extra ms, extra
// prompts}.
const admitScript = `
local k, s = KEYS[1], ARGV[1]
local lg, lj = tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', k, 'gpu_ms'..s, 'admitted'..s, 'extra_gpu_ms'..s, 'extra_jobs'..s)
local used, adm, xg, xj = tonumber(v[1] or '0'), tonumber(v[2] or '0'), tonumber(v[3] or '0'), tonumber(v[4] or '0')
redis.call('HSET', k, 'lim_gpu_ms'..s, lg, 'lim_jobs'..s, lj)
local kind = 0
if lj > 0 and adm >= lj + xj then
  kind = 2
elseif lg > 0 and used >= lg + xg then
  kind = 1
else
  adm = redis.call('HINCRBY', k, 'admitted'..s, 1)
end
redis.call('EXPIRE', k, ARGV[4])
return {kind, used, adm, xg, xj}
`

// unadmitScript takes one admission back, never below zero.
const unadmitScript = `
local f = 'admitted'..ARGV[1]
if tonumber(redis.call('HGET', KEYS[1], f) or '0') > 0 then
  redis.call('HINCRBY', KEYS[1], f, -1)
end
return 0
`

// recordScript: KEYS[1] the day, KEYS[2] the job's marker; ARGV TTL,
// marker TTL, then field/increment pairs. A job is counted once.
const recordScript = `
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  return 0
end
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i+1])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
`

// raiseScript adds to the day's extras; resetScript sets them to what
// was used, so that the whole quota is free again.
const raiseScript = `
redis.call('HINCRBY', KEYS[1], 'extra_gpu_ms'..ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'extra_jobs'..ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 0
`

const resetScript = `
local s = ARGV[1]
local v = redis.call('HMGET', KEYS[1], 'gpu_ms'..s, 'admitted'..s)
redis.call('HSET', KEYS[1], 'extra_gpu_ms'..s, v[1] or '0', 'extra_jobs'..s, v[2] or '0')
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 0
`

var (
	luaAdmit   = valkey.NewLuaScript(admitScript) // not idempotent: never retried
	luaUnadmit = valkey.NewLuaScript(unadmitScript)
	luaRecord  = valkey.NewLuaScriptRetryable(recordScript)
	luaRaise   = valkey.NewLuaScript(raiseScript)
	luaReset   = valkey.NewLuaScriptRetryable(resetScript)
)

func suffix(pool, user string) string { return fieldSep + pool + fieldSep + user }

// Admit implements Ledger.
func (l *ValkeyLedger) Admit(ctx context.Context, day, pool, user string, lim Limits) error {
	if err := checkArgs(day, pool, user); err != nil {
		return err
	}
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	v, err := luaAdmit.Exec(ctx, l.client, []string{l.dayKey(day)}, []string{suffix(pool, user),
		strconv.FormatInt(max(lim.GPU.Milliseconds(), 0), 10), strconv.FormatInt(max(lim.Jobs, 0), 10), l.ttl()}).AsIntSlice()
	if err != nil {
		return fmt.Errorf("usage: admitting a prompt of %s: %w", user, err)
	}
	if len(v) != 5 {
		return fmt.Errorf("usage: admit script answered %v", v)
	}
	switch v[0] {
	case 1:
		return exceeded(day, pool, KindGPU, v[1], v[2], v[3], v[4], lim, l.now())
	case 2:
		return exceeded(day, pool, KindJobs, v[1], v[2], v[3], v[4], lim, l.now())
	}
	return nil
}

// Unadmit implements Ledger.
func (l *ValkeyLedger) Unadmit(ctx context.Context, day, pool, user string) error {
	if err := checkArgs(day, pool, user); err != nil {
		return err
	}
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	return luaUnadmit.Exec(ctx, l.client, []string{l.dayKey(day)}, []string{suffix(pool, user)}).Error()
}

// Record implements Ledger.
func (l *ValkeyLedger) Record(ctx context.Context, e JobEnd) error {
	if err := checkArgs(e.Day, e.Pool, e.User); err != nil {
		return err
	}
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	args := []string{l.ttl(), strconv.Itoa(3 * 24 * 3600)}
	for _, fv := range endFields(e) {
		args = append(args, fv.f, strconv.FormatInt(fv.v, 10))
	}
	return luaRecord.Exec(ctx, l.client, []string{l.dayKey(e.Day), l.prefix + "usage:done:" + e.JobID}, args).Error()
}

// usageBatch is how many days one round trip reads.
const usageBatch = 16

// Usage implements Ledger. Each day is read whole (HGETALL) and filtered
// here, a few days per round trip.
func (l *ValkeyLedger) Usage(ctx context.Context, q Query) ([]Row, error) {
	ctx, cancel := context.WithTimeout(ctx, 4*l.Timeout)
	defer cancel()
	set := newRowSet(q)
	// One user's row of one pool (what a dispatch checks against the
	// quota) reads just its fields, not the whole day of every user.
	var fields []string
	if q.User != "" && q.Pool != "" {
		fields = make([]string, len(rowMetrics))
		for i, m := range rowMetrics {
			fields[i] = field(m, q.Pool, q.User)
		}
	}
	days := q.Days()
	for len(days) > 0 {
		batch := days[:min(usageBatch, len(days))]
		days = days[len(batch):]
		cmds := make(valkey.Commands, 0, len(batch))
		for _, d := range batch {
			if fields != nil {
				cmds = append(cmds, l.client.B().Hmget().Key(l.dayKey(d)).Field(fields...).Build())
			} else {
				cmds = append(cmds, l.client.B().Hgetall().Key(l.dayKey(d)).Build())
			}
		}
		for i, res := range l.client.DoMulti(ctx, cmds...) {
			if err := l.addDay(set, batch[i], fields, res); err != nil {
				return nil, err
			}
		}
	}
	return set.sorted(), nil
}

// addDay adds one day's answer to set: HGETALL's map, or HMGET's values of
// fields (nil where a field is not set).
func (l *ValkeyLedger) addDay(set *rowSet, day string, fields []string, res valkey.ValkeyResult) error {
	if fields == nil {
		m, err := res.AsIntMap()
		if err != nil {
			return fmt.Errorf("usage: reading %s: %w", day, err)
		}
		for f, v := range m {
			if err := set.add(day, f, v); err != nil {
				return err
			}
		}
		return nil
	}
	vals, err := res.ToArray()
	if err != nil {
		return fmt.Errorf("usage: reading %s: %w", day, err)
	}
	for i, v := range vals {
		if i >= len(fields) {
			break
		}
		n, err := v.AsInt64()
		if valkey.IsValkeyNil(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("usage: reading %s: %w", day, err)
		}
		if err := set.add(day, fields[i], n); err != nil {
			return err
		}
	}
	return nil
}

// Raise implements Ledger.
func (l *ValkeyLedger) Raise(ctx context.Context, day, pool, user string, gpu time.Duration, jobs int64) error {
	if err := checkArgs(day, pool, user); err != nil {
		return err
	}
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	return luaRaise.Exec(ctx, l.client, []string{l.dayKey(day)}, []string{suffix(pool, user),
		strconv.FormatInt(gpu.Milliseconds(), 10), strconv.FormatInt(jobs, 10), l.ttl()}).Error()
}

// Reset implements Ledger.
func (l *ValkeyLedger) Reset(ctx context.Context, day, pool, user string) error {
	if err := checkArgs(day, pool, user); err != nil {
		return err
	}
	ctx, cancel := l.ctx(ctx)
	defer cancel()
	return luaReset.Exec(ctx, l.client, []string{l.dayKey(day)}, []string{suffix(pool, user), l.ttl()}).Error()
}

var _ Ledger = (*ValkeyLedger)(nil)
