package dispatch

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/valkey-io/valkey-go"

	"github.com/comfyume/comfyume/comfy"
)

// ValkeyStore keeps job records in Valkey so that several gateways (Caddy
// replicas) share them and a restart forgets nothing. Safe for concurrent
// use.
//
// Keys, all under the store's prefix:
//
//	<prefix>job:<id>            string: the Job as JSON
//	<prefix>user:<user>:jobs    sorted set: the user's job ids, scored by Number
//	<prefix>active              sorted set: ids of pending/in_progress jobs, scored by Number
//	<prefix>lease:<id>          string: the owner holding the job's lease, with a PX expiry
//
// A record and its index entries change together, in one Lua script, so a
// crash never leaves a half-written job. The scripts also touch the index of
// a job's previous user, whose key they derive from the stored record: in a
// Valkey cluster, give a prefix with a hash tag (e.g. "{comfyume}:") so that
// every key lives in one slot.
//
// Records are read without client-side caching: a gateway must see another
// gateway's write at once (Create's idempotency, a finished job's history).
type ValkeyStore struct {
	client valkey.Client
	prefix string

	// Timeout bounds each call whose context has no deadline (the default
	// is 5s), so that a Valkey outage yields errors rather than stalls:
	// valkey-go retries idempotent commands until the context ends.
	Timeout time.Duration

	// bodies remembers the jobs whose immutable body this process wrote.
	bodies sync.Map
}

// NewValkeyStore returns a store keeping its keys under prefix (e.g.
// "comfyume:") in the Valkey that client talks to. The caller owns client.
func NewValkeyStore(client valkey.Client, prefix string) *ValkeyStore {
	return &ValkeyStore{client: client, prefix: prefix, Timeout: 5 * time.Second}
}

// saveScript writes a record and its index entries. With ARGV[7] == "1" it
// does nothing and returns 0 if the record exists (Create); otherwise it
// returns 1. An active state over an ended record (not in the active
// index) is not written: a job that ended stays ended. An ended job's
// stored output bytes, if any, go into the user's outputs hash.
//
//	KEYS: job, user index, active index, body, user outputs hash
//	ARGV: id, record JSON, score, active ("1"/"0"), user index key head
//	      ("<prefix>user:"), user, only-if-absent ("1"/"0"), body (or
//	      ""), stored output bytes
const saveScript = `
local old = redis.call('GET', KEYS[1])
if old then
  if ARGV[7] == '1' then return 0 end
  if ARGV[4] == '1' and not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
    return 1 -- ended for good: an older state arriving late changes nothing
  end
  if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
    local ok, rec = pcall(cjson.decode, old)
    if ok and type(rec) == 'table' and type(rec.user) == 'string' and rec.user ~= ARGV[6] then
      redis.call('ZREM', ARGV[5] .. rec.user .. ':jobs', ARGV[1])
      redis.call('HDEL', ARGV[5] .. rec.user .. ':outputs', ARGV[1])
    end
  end
end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[8] ~= '' then redis.call('SET', KEYS[4], ARGV[8]) end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
  if ARGV[9] ~= '0' then
    redis.call('HSET', KEYS[5], ARGV[1], ARGV[9])
  else
    redis.call('HDEL', KEYS[5], ARGV[1])
  end
end
return 1
`

// deleteScript removes a record, its index entries and its lease.
//
//	KEYS: job, active index, lease
//	ARGV: id, user index key head ("<prefix>user:")
const deleteScript = `
local old = redis.call('GET', KEYS[1])
if old then
  local ok, rec = pcall(cjson.decode, old)
  if ok and type(rec) == 'table' and type(rec.user) == 'string' then
    redis.call('ZREM', ARGV[2] .. rec.user .. ':jobs', ARGV[1])
    redis.call('HDEL', ARGV[2] .. rec.user .. ':outputs', ARGV[1])
  end
end
redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
`

// claimScript takes a free lease or renews the caller's own; 1 if the
// caller holds it afterwards.
//
//	KEYS: lease
//	ARGV: owner, ttl in milliseconds
const claimScript = `
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
`

var (
	// Saving, deleting and claiming (by the same owner) are idempotent, so
	// valkey-go may retry them after a network error.
	luaSave   = valkey.NewLuaScriptRetryable(saveScript)
	luaDelete = valkey.NewLuaScriptRetryable(deleteScript)
	luaClaim  = valkey.NewLuaScriptRetryable(claimScript)
	// Create is not: a retry after a lost reply would report ErrExists for
	// the caller's own record.
	luaCreate = valkey.NewLuaScript(saveScript)
)

// mgetBatch bounds the keys read by one MGET so that a long history does
// not become one huge reply.
const mgetBatch = 256

// Keys made from ids and user names stay apart: a job id is one name of
// validID's alphabet (no ":", so "job:<id>" is never another job's
// "job:<id>:body"; reads of other ids find nothing), and a user name, which
// may hold anything, is followed by a fixed suffix (":jobs") or ends the
// key ("queue:<pool>:wait:<user>"), so no two users share a key.
// validID reports whether id can name a job: 1 to 128 letters, digits,
// ".", "_" or "-" (the gateway's ids are UUIDs).
func validID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

func (s *ValkeyStore) jobKey(id string) string    { return s.prefix + "job:" + id }
func (s *ValkeyStore) bodyKey(id string) string   { return s.prefix + "job:" + id + ":body" }
func (s *ValkeyStore) userHead() string           { return s.prefix + "user:" }
func (s *ValkeyStore) userKey(user string) string { return s.userHead() + user + ":jobs" }

// outputsKey is the hash of the user's ended jobs with stored outputs: job
// id → bytes (EndedOutputBytes).
func (s *ValkeyStore) outputsKey(user string) string { return s.userHead() + user + ":outputs" }
func (s *ValkeyStore) activeKey() string             { return s.prefix + "active" }
func (s *ValkeyStore) leaseKey(id string) string     { return s.prefix + "lease:" + id }
func (s *ValkeyStore) wrap(op string, err error) error {
	return fmt.Errorf("valkey store: %s: %w", op, err)
}

// bound applies Timeout to a context without a deadline.
func (s *ValkeyStore) bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok || s.Timeout <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, s.Timeout)
}

// ActiveCount implements Store: the size of the intersection of the user's
// index and the active index (ZINTERCARD, Valkey 7+ / Redis 7+).
func (s *ValkeyStore) ActiveCount(ctx context.Context, user string) (int, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	n, err := s.client.Do(ctx, s.client.B().Zintercard().Numkeys(2).Key(s.userKey(user), s.activeKey()).Build()).AsInt64()
	if err != nil {
		return 0, s.wrap("active count of user "+user, err)
	}
	return int(n), nil
}

// slotScript takes a slot of an endpoint if fewer than max unexpired holders
// have one: KEYS[1] the endpoint's holders (score: expiry, ms); ARGV now,
// max, expiry, token, key ttl (ms).
const slotScript = `
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 1
end
return 0
`

var luaSlot = valkey.NewLuaScriptRetryable(slotScript)

func (s *ValkeyStore) slotKey(endpoint string) string { return s.prefix + "slots:" + endpoint }

// AcquireSlot implements SharedSlots.
func (s *ValkeyStore) AcquireSlot(ctx context.Context, endpoint string, max int, token string, ttl time.Duration) (bool, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	now := time.Now()
	n, err := luaSlot.Exec(ctx, s.client, []string{s.slotKey(endpoint)}, []string{
		strconv.FormatInt(now.UnixMilli(), 10), strconv.Itoa(max),
		strconv.FormatInt(now.Add(ttl).UnixMilli(), 10), token, strconv.FormatInt(ttl.Milliseconds()*2, 10),
	}).AsInt64()
	if err != nil {
		return false, s.wrap("slot of "+endpoint, err)
	}
	return n == 1, nil
}

// RenewSlot implements SharedSlots.
func (s *ValkeyStore) RenewSlot(ctx context.Context, endpoint, token string, ttl time.Duration) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	exp := float64(time.Now().Add(ttl).UnixMilli())
	if err := s.client.Do(ctx, s.client.B().Zadd().Key(s.slotKey(endpoint)).Xx().ScoreMember().ScoreMember(exp, token).Build()).Error(); err != nil {
		return s.wrap("renew slot of "+endpoint, err)
	}
	return nil
}

// ReleaseSlot implements SharedSlots.
func (s *ValkeyStore) ReleaseSlot(ctx context.Context, endpoint, token string) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	if err := s.client.Do(ctx, s.client.B().Zrem().Key(s.slotKey(endpoint)).Member(token).Build()).Error(); err != nil {
		return s.wrap("release slot of "+endpoint, err)
	}
	return nil
}

// Ping checks that Valkey answers (the gateway reports 503 while it does
// not).
func (s *ValkeyStore) Ping(ctx context.Context) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	if err := s.client.Do(ctx, s.client.B().Ping().Build()).Error(); err != nil {
		return s.wrap("ping", err)
	}
	return nil
}

// Save implements Store.
func (s *ValkeyStore) Save(ctx context.Context, j *Job) error {
	_, err := s.save(ctx, luaSave, j, false)
	return err
}

// Create implements Store.
func (s *ValkeyStore) Create(ctx context.Context, j *Job) error {
	created, err := s.save(ctx, luaCreate, j, true)
	if err != nil {
		return err
	}
	if !created {
		return ErrExists
	}
	return nil
}

func (s *ValkeyStore) save(ctx context.Context, script *valkey.Lua, j *Job, onlyIfAbsent bool) (bool, error) {
	op := "save " + j.ID
	if onlyIfAbsent {
		op = "create " + j.ID
	}
	// The prompt and extra_data (the UI workflow: often megabytes) never
	// change after submission: they live under their own key, written by
	// the first save of this process, so that the many state changes of a
	// job rewrite a small record.
	state := *j
	state.Prompt, state.ExtraData = nil, nil
	b, err := marshalJob(&state)
	if err != nil {
		return false, s.wrap(op, err)
	}
	var body []byte
	if _, written := s.bodies.Load(j.ID); !written && (len(j.Prompt) > 0 || j.ExtraData != nil) {
		body = encodeBody(j)
	}
	ctx, cancel := s.bound(ctx)
	defer cancel()
	n, err := script.Exec(ctx, s.client,
		[]string{s.jobKey(j.ID), s.userKey(j.User), s.activeKey(), s.bodyKey(j.ID), s.outputsKey(j.User)},
		[]string{j.ID, string(b), score(j.Number), flag(j.Active()), s.userHead(), j.User, flag(onlyIfAbsent), string(body),
			strconv.FormatInt(max(j.StoredBytes, 0), 10)},
	).AsInt64()
	if err != nil {
		return false, s.wrap(op, err)
	}
	switch {
	case n == 1 && !j.Active():
		s.bodies.Delete(j.ID) // ended: no more saves to spare the body
	case n == 1 && body != nil:
		s.bodies.Store(j.ID, struct{}{})
	}
	return n == 1, nil
}

// encodeBody writes a job's immutable part as jobBody would be marshalled,
// but without re-encoding the values: they are the client's JSON, checked
// when the prompt came in, and the workflow in extra_data is often
// megabytes.
func encodeBody(j *Job) []byte {
	size := len(j.Prompt) + 32
	for _, v := range j.ExtraData {
		size += len(v) + 32
	}
	b := make([]byte, 0, size)
	b = append(b, '{')
	if len(j.Prompt) > 0 {
		b = append(b, `"prompt":`...)
		b = append(b, j.Prompt...)
	}
	if j.ExtraData != nil {
		if len(j.Prompt) > 0 {
			b = append(b, ',')
		}
		b = append(b, `"extra_data":`...)
		b = comfy.AppendObject(b, j.ExtraData)
	}
	return append(b, '}')
}

// jobBody is the immutable part of a job record.
type jobBody struct {
	Prompt    json.RawMessage            `json:"prompt,omitempty"`
	ExtraData map[string]json.RawMessage `json:"extra_data,omitempty"`
}

// decodeJob reads a job from its state record and its body (nil if none).
func decodeJob(state, body []byte) (*Job, error) {
	j := new(Job)
	if err := json.Unmarshal(state, j); err != nil {
		return nil, err
	}
	// The state record carries "prompt": null; the body, if read, the rest.
	j.Prompt = nil
	if len(body) > 0 {
		var jb jobBody
		if err := json.Unmarshal(body, &jb); err != nil {
			return nil, err
		}
		j.Prompt, j.ExtraData = jb.Prompt, jb.ExtraData
	}
	return j, nil
}

// Job implements Store.
func (s *ValkeyStore) Job(ctx context.Context, id string) (*Job, error) {
	if !validID(id) {
		return nil, ErrNotFound
	}
	ctx, cancel := s.bound(ctx)
	defer cancel()
	res := s.client.DoMulti(ctx, s.client.B().Get().Key(s.jobKey(id)).Build(), s.client.B().Get().Key(s.bodyKey(id)).Build())
	b, err := res[0].AsBytes()
	if valkey.IsValkeyNil(err) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, s.wrap("get "+id, err)
	}
	body, err := res[1].AsBytes()
	if err != nil && !valkey.IsValkeyNil(err) {
		return nil, s.wrap("get "+id, err)
	}
	j, err := decodeJob(b, body)
	if err != nil {
		return nil, s.wrap("decode "+id, err)
	}
	return j, nil
}

// JobSummary implements Store: the state record only.
func (s *ValkeyStore) JobSummary(ctx context.Context, id string) (*Job, error) {
	if !validID(id) {
		return nil, ErrNotFound
	}
	ctx, cancel := s.bound(ctx)
	defer cancel()
	b, err := s.client.Do(ctx, s.client.B().Get().Key(s.jobKey(id)).Build()).AsBytes()
	if valkey.IsValkeyNil(err) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, s.wrap("get "+id, err)
	}
	j, err := decodeJob(b, nil)
	if err != nil {
		return nil, s.wrap("decode "+id, err)
	}
	return j, nil
}

// UserJobs implements Store.
func (s *ValkeyStore) UserJobs(ctx context.Context, user string) ([]*Job, error) {
	return s.userJobs(ctx, user, true)
}

// UserJobSummaries implements Store.
func (s *ValkeyStore) UserJobSummaries(ctx context.Context, user string) ([]*Job, error) {
	return s.userJobs(ctx, user, false)
}

func (s *ValkeyStore) userJobs(ctx context.Context, user string, withBody bool) ([]*Job, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	jobs, err := s.indexed(ctx, s.userKey(user), withBody)
	if err != nil {
		return nil, s.wrap("jobs of user "+user, err)
	}
	out := make([]*Job, 0, len(jobs))
	for _, j := range jobs {
		if j.User == user {
			out = append(out, j)
		}
	}
	return out, nil
}

// ActiveJobs implements Store.
func (s *ValkeyStore) ActiveJobs(ctx context.Context) ([]*Job, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	jobs, err := s.indexed(ctx, s.activeKey(), false)
	if err != nil {
		return nil, s.wrap("active jobs", err)
	}
	out := jobs[:0]
	for _, j := range jobs {
		if j.Active() {
			out = append(out, j)
		}
	}
	return out, nil
}

// indexed reads the records whose ids a sorted set holds, in SortJobs
// order, with their bodies if withBody. Ids without a record (a concurrent
// Delete) are skipped.
func (s *ValkeyStore) indexed(ctx context.Context, index string, withBody bool) ([]*Job, error) {
	ids, err := s.client.Do(ctx, s.client.B().Zrange().Key(index).Min("0").Max("-1").Build()).AsStrSlice()
	if err != nil {
		return nil, err
	}
	out := make([]*Job, 0, len(ids))
	for start := 0; start < len(ids); start += mgetBatch {
		batch := ids[start:min(start+mgetBatch, len(ids))]
		keys := make([]string, 0, 2*len(batch))
		for _, id := range batch {
			keys = append(keys, s.jobKey(id))
			if withBody {
				keys = append(keys, s.bodyKey(id))
			}
		}
		vals, err := valkey.MGet(s.client, ctx, keys)
		if err != nil {
			return nil, err
		}
		for _, id := range batch {
			k := s.jobKey(id)
			v, ok := vals[k]
			if !ok || v.IsNil() {
				continue
			}
			b, err := v.AsBytes()
			if err != nil {
				return nil, err
			}
			var body []byte
			if bv, ok := vals[s.bodyKey(id)]; ok && !bv.IsNil() {
				if body, err = bv.AsBytes(); err != nil {
					return nil, err
				}
			}
			j, err := decodeJob(b, body)
			if err != nil {
				return nil, fmt.Errorf("decode %s: %w", k, err)
			}
			out = append(out, j)
		}
	}
	SortJobs(out)
	return out, nil
}

// Delete implements Store.
func (s *ValkeyStore) Delete(ctx context.Context, id string) error {
	if !validID(id) {
		return nil
	}
	ctx, cancel := s.bound(ctx)
	defer cancel()
	err := luaDelete.Exec(ctx, s.client,
		[]string{s.jobKey(id), s.activeKey(), s.leaseKey(id), s.bodyKey(id)},
		[]string{id, s.userHead()},
	).Error()
	if err != nil {
		return s.wrap("delete "+id, err)
	}
	s.bodies.Delete(id)
	return nil
}

// trimScript forgets a user's oldest ended jobs beyond the newest keep,
// and (budget > 0) beyond the newest whose bodies fit in budget bytes
// together (the newest one is always kept).
//
//	KEYS: user index, active index, user outputs hash
//	ARGV: keep, job key head ("<prefix>job:"), lease key head, budget
const trimScript = `
local budget = tonumber(ARGV[4])
if budget <= 0 and redis.call('ZCARD', KEYS[1]) <= tonumber(ARGV[1]) then return {} end
local ended = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if not redis.call('ZSCORE', KEYS[2], id) then table.insert(ended, id) end
end
local n = math.min(#ended, tonumber(ARGV[1]))
if budget > 0 then
  local sum = 0
  for i = 0, n - 1 do
    sum = sum + redis.call('STRLEN', ARGV[2] .. ended[#ended - i] .. ':body')
    if sum > budget and i > 0 then n = i break end
  end
end
local gone = {}
for i = 1, #ended - n do
  local id = ended[i]
  redis.call('DEL', ARGV[2] .. id, ARGV[2] .. id .. ':body', ARGV[3] .. id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[3], id)
  table.insert(gone, id)
end
return gone
`

var luaTrim = valkey.NewLuaScriptRetryable(trimScript)

// Trim implements Store.
func (s *ValkeyStore) Trim(ctx context.Context, user string, keep int, budget int64) ([]string, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	gone, err := luaTrim.Exec(ctx, s.client, []string{s.userKey(user), s.activeKey(), s.outputsKey(user)},
		[]string{strconv.Itoa(keep), s.prefix + "job:", s.prefix + "lease:", strconv.FormatInt(max(budget, 0), 10)}).AsStrSlice()
	if err != nil {
		return nil, s.wrap("trim jobs of user "+user, err)
	}
	for _, id := range gone {
		s.bodies.Delete(id)
	}
	return gone, nil
}

// outputsSumScript adds up a user's outputs hash (KEYS[1]).
const outputsSumScript = `
local sum = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do sum = sum + tonumber(v) end
return sum
`

var luaOutputsSum = valkey.NewLuaScriptRetryable(outputsSumScript)

// EndedOutputBytes reports the total StoredBytes of the user's ended jobs,
// kept in a hash beside their index as records are saved, deleted and
// trimmed: the end of a job with outputs checks the user's outputs budget
// with one small read, not a read of their whole history.
func (s *ValkeyStore) EndedOutputBytes(ctx context.Context, user string) (int64, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	n, err := luaOutputsSum.Exec(ctx, s.client, []string{s.outputsKey(user)}, nil).AsInt64()
	if err != nil {
		return 0, s.wrap("outputs of user "+user, err)
	}
	return n, nil
}

// Claim implements Store.
func (s *ValkeyStore) Claim(ctx context.Context, id, owner string, ttl time.Duration) (bool, error) {
	ms := ttl.Milliseconds()
	if ttl%time.Millisecond != 0 {
		ms++ // PX counts whole milliseconds; never shorten a lease
	}
	ms = max(ms, 1)
	ctx, cancel := s.bound(ctx)
	defer cancel()
	n, err := luaClaim.Exec(ctx, s.client,
		[]string{s.leaseKey(id)},
		[]string{owner, strconv.FormatInt(ms, 10)},
	).AsInt64()
	if err != nil {
		return false, s.wrap("claim "+id, err)
	}
	return n == 1, nil
}

// marshalJob encodes a record without HTML escaping, so that its raw JSON
// fields (prompt, outputs, messages) come back byte for byte.
func marshalJob(j any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(j); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// score formats a job's Number as a sorted-set score (json.Marshal has
// already refused NaN and infinities).
func score(n float64) string { return strconv.FormatFloat(n, 'g', -1, 64) }

func flag(b bool) string {
	if b {
		return "1"
	}
	return "0"
}
