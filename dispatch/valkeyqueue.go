package dispatch

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/valkey-io/valkey-go"
)

// The shared queue's keys, under the store's prefix:
//
//	<prefix>queue:<pool>:users      sorted set (lexical): one member per user with waiting
//	                                jobs, "<priority>|<served>|<arrival>|<user>", so the
//	                                first member is the user the rule serves next (before
//	                                running counts)
//	<prefix>queue:<pool>:members    hash: user → their current member of :users
//	<prefix>queue:<pool>:served     hash: user → sequence number of their last start
//	<prefix>queue:<pool>:seq        string: the pool's sequence counter
//	<prefix>queue:<pool>:wait:<user> sorted set: the user's waiting job ids, by creation
//	<prefix>inbox:<owner>           list: jobs other gateways handed to this gateway
//	<prefix>slots:<endpoint>        sorted set: slot holders "<token>|<user>", by expiry
//
// Priority, served and arrival are fixed-width decimals so that the lexical
// order is the rule's order: priority inverted (higher first), then the
// least recently served, then the first to arrive.

const (
	prioSpan   = 1_000_000_000
	userOffset = 10 + 1 + 20 + 1 + 20 + 1 // where the user's name starts (0-based)
)

func prioKey(p int) string {
	p = max(-prioSpan+1, min(prioSpan-1, p))
	return fmt.Sprintf("%010d", prioSpan-p)
}

func prioFromKey(s string) int {
	n, _ := strconv.Atoi(s)
	return prioSpan - n
}

// enqueueScript — KEYS: users, members, served, seq, wait(user);
// ARGV: id, order, user, priority key. 1 if the job was added.
const enqueueScript = `
local added = redis.call('ZADD', KEYS[5], 'NX', ARGV[2], ARGV[1])
if not redis.call('HGET', KEYS[2], ARGV[3]) then
  local s = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
  local a = redis.call('INCR', KEYS[4])
  local m = ARGV[4] .. '|' .. string.format('%020d', s) .. '|' .. string.format('%020d', a) .. '|' .. ARGV[3]
  redis.call('ZADD', KEYS[1], 0, m)
  redis.call('HSET', KEYS[2], ARGV[3], m)
end
return added
`

// dequeueScript — KEYS: users, members, wait(user); ARGV: id, user.
const dequeueScript = `
local n = redis.call('ZREM', KEYS[3], ARGV[1])
if n == 1 and redis.call('ZCARD', KEYS[3]) == 0 then
  local m = redis.call('HGET', KEYS[2], ARGV[2])
  if m then
    redis.call('ZREM', KEYS[1], m)
    redis.call('HDEL', KEYS[2], ARGV[2])
  end
end
return n
`

// takeScript — KEYS: users, members, served, seq;
// ARGV: now, slot expiry, slot key ttl, token, max running, wait head,
// lease head, inbox head, slot head, caller, inbox ttl, pool, user offset,
// then (endpoint, max, tier) triples: tier 1 may take a job, 2 is a trial,
// 0 only counts.
const takeScript = `
local now = ARGV[1]
local running = {}
local best, bestLoad, trial = nil, nil, nil
local function live(ep)
  local k = ARGV[9] .. ep
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  local ms = redis.call('ZRANGE', k, 0, -1)
  for _, m in ipairs(ms) do
    local bar = string.find(m, '|', 1, true)
    if bar then
      local u = string.sub(m, bar + 1)
      running[u] = (running[u] or 0) + 1
    end
  end
  return #ms
end
local i = 14
while ARGV[i] do
  local ep, max, tier = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  i = i + 3
  local n = live(ep)
  local free = max <= 0 or n < max
  if tier == '1' and free and (bestLoad == nil or n < bestLoad) then
    best, bestLoad = ep, n
  elseif tier == '2' and free and trial == nil then
    trial = ep
  end
end
local ep = best or trial
if not ep then return false end

local maxr = tonumber(ARGV[5])
local off = tonumber(ARGV[13])
local pick, pickR, pickP = nil, nil, nil
local start = 0
local done = false
while not done do
  local ms = redis.call('ZRANGE', KEYS[1], start, start + 63)
  if #ms == 0 then break end
  for _, m in ipairs(ms) do
    local p = string.sub(m, 1, 10)
    if pick and p ~= pickP then done = true break end
    local u = string.sub(m, off + 1)
    local r = running[u] or 0
    if maxr <= 0 or r < maxr then
      if pick == nil or r < pickR then pick, pickR, pickP = u, r, p end
      if r == 0 then done = true break end
    end
  end
  start = start + 64
end
if not pick then return false end

local wk = ARGV[6] .. pick
local id = redis.call('ZRANGE', wk, 0, 0)[1]
local old = redis.call('HGET', KEYS[2], pick)
if not id then
  if old then redis.call('ZREM', KEYS[1], old) end
  redis.call('HDEL', KEYS[2], pick)
  return false
end
redis.call('ZREM', wk, id)
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[3], pick, seq)
if old then redis.call('ZREM', KEYS[1], old) end
if redis.call('ZCARD', wk) > 0 then
  local arrival = old and string.sub(old, 33, 52) or string.format('%020d', seq)
  local m = pickP .. '|' .. string.format('%020d', seq) .. '|' .. arrival .. '|' .. pick
  redis.call('ZADD', KEYS[1], 0, m)
  redis.call('HSET', KEYS[2], pick, m)
else
  redis.call('HDEL', KEYS[2], pick)
end
local member = ARGV[4] .. '|' .. pick
local sk = ARGV[9] .. ep
redis.call('ZADD', sk, ARGV[2], member)
redis.call('PEXPIRE', sk, ARGV[3])
local owner = redis.call('GET', ARGV[7] .. id) or ''
if owner ~= '' and owner ~= ARGV[10] then
  local ib = ARGV[8] .. owner
  redis.call('RPUSH', ib, ARGV[12] .. '\n' .. id .. '\n' .. ep .. '\n' .. member .. '\n' .. pick)
  redis.call('PEXPIRE', ib, ARGV[11])
end
return {id, pick, ep, member, owner}
`

// queueStateScript — KEYS: users; ARGV: wait head, now, slot head,
// endpoints...
const queueStateScript = `
local q = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  table.insert(q, m)
  table.insert(q, redis.call('ZRANGE', ARGV[1] .. string.sub(m, 54), 0, -1))
end
local r = {}
for i = 4, #ARGV do
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', ARGV[3] .. ARGV[i], '(' .. ARGV[2], '+inf')) do
    table.insert(r, m)
  end
end
return {q, r}
`

var (
	// Enqueue and Dequeue are idempotent; Take is not (a retry after a lost
	// reply would take a second job).
	luaEnqueue    = valkey.NewLuaScriptRetryable(enqueueScript)
	luaDequeue    = valkey.NewLuaScriptRetryable(dequeueScript)
	luaTake       = valkey.NewLuaScript(takeScript)
	luaQueueState = valkey.NewLuaScriptReadOnly(queueStateScript)
)

func (s *ValkeyStore) queueHead(pool string) string { return s.prefix + "queue:" + pool + ":" }
func (s *ValkeyStore) waitHead(pool string) string  { return s.queueHead(pool) + "wait:" }
func (s *ValkeyStore) inboxKey(owner string) string { return s.prefix + "inbox:" + owner }

func (s *ValkeyStore) queueKeys(pool string) []string {
	h := s.queueHead(pool)
	return []string{h + "users", h + "members", h + "served", h + "seq"}
}

// Enqueue implements SharedQueue.
func (s *ValkeyStore) Enqueue(ctx context.Context, j QueuedJob) error {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	keys := append(s.queueKeys(j.Pool), s.waitHead(j.Pool)+j.User)
	if err := luaEnqueue.Exec(ctx, s.client, keys, []string{j.ID, score(j.Order), j.User, prioKey(j.Priority)}).Error(); err != nil {
		return s.wrap("queue job "+j.ID, err)
	}
	return nil
}

// Dequeue implements SharedQueue.
func (s *ValkeyStore) Dequeue(ctx context.Context, pool, user, id string) (bool, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	k := s.queueKeys(pool)
	n, err := luaDequeue.Exec(ctx, s.client, []string{k[0], k[1], s.waitHead(pool) + user}, []string{id, user}).AsInt64()
	if err != nil {
		return false, s.wrap("unqueue job "+id, err)
	}
	return n == 1, nil
}

// inboxTTL bounds how long handed-over jobs wait for a gateway that stopped
// reading its inbox; their slots expire sooner, and the jobs are taken over
// once their leases expire.
const inboxTTL = 10 * time.Minute

// Take implements SharedQueue.
func (s *ValkeyStore) Take(ctx context.Context, t TakeRequest) (*Assignment, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	now := time.Now()
	args := []string{
		strconv.FormatInt(now.UnixMilli(), 10),
		strconv.FormatInt(now.Add(t.TTL).UnixMilli(), 10),
		strconv.FormatInt(t.TTL.Milliseconds()*2, 10),
		t.Token,
		strconv.Itoa(t.MaxRunning),
		s.waitHead(t.Pool),
		s.prefix + "lease:",
		s.prefix + "inbox:",
		s.prefix + "slots:",
		t.Owner,
		strconv.FormatInt(inboxTTL.Milliseconds(), 10),
		t.Pool,
		strconv.Itoa(userOffset),
	}
	for _, e := range t.Endpoints {
		args = append(args, e.Endpoint, strconv.Itoa(e.Max), "1")
	}
	for _, e := range t.Trial {
		args = append(args, e.Endpoint, strconv.Itoa(e.Max), "2")
	}
	for _, e := range t.Others {
		args = append(args, e, "0", "0")
	}
	res := luaTake.Exec(ctx, s.client, s.queueKeys(t.Pool), args)
	if valkey.IsValkeyNil(res.Error()) {
		return nil, nil
	}
	vals, err := res.AsStrSlice()
	if err != nil {
		return nil, s.wrap("take a job of pool "+t.Pool, err)
	}
	if len(vals) != 5 {
		return nil, fmt.Errorf("valkey: take: unexpected reply %q", vals)
	}
	return &Assignment{Pool: t.Pool, JobID: vals[0], User: vals[1], Endpoint: vals[2], Token: vals[3], Owner: vals[4]}, nil
}

// Assignments implements SharedQueue: a blocking pop on the gateway's inbox,
// then whatever else is in it.
func (s *ValkeyStore) Assignments(ctx context.Context, owner string, wait time.Duration) ([]Assignment, error) {
	key := s.inboxKey(owner)
	bctx, cancel := context.WithTimeout(ctx, wait+5*time.Second)
	defer cancel()
	kv, err := s.client.Do(bctx, s.client.B().Blpop().Key(key).Timeout(wait.Seconds()).Build()).AsStrSlice()
	if valkey.IsValkeyNil(err) {
		return nil, nil
	}
	if err != nil {
		return nil, s.wrap("read inbox", err)
	}
	raw := kv[1:]
	more, err := s.client.Do(bctx, s.client.B().Lpop().Key(key).Count(255).Build()).AsStrSlice()
	if err == nil {
		raw = append(raw, more...)
	}
	out := make([]Assignment, 0, len(raw))
	for _, r := range raw {
		if a, ok := parseAssignment(r); ok {
			a.Owner = owner
			out = append(out, a)
		}
	}
	return out, nil
}

// parseAssignment reads an inbox entry "<pool>\n<id>\n<endpoint>\n<token>
// \n<user>", where the token is "<uuid>|<user>". Pool, id and endpoint
// never hold a newline; the user (from outside) may hold anything, so it is
// found by the shape of the rest: "<uuid>|<user>\n<user>".
func parseAssignment(r string) (Assignment, bool) {
	f := strings.SplitN(r, "\n", 4)
	if len(f) != 4 {
		return Assignment{}, false
	}
	rest := f[3]
	bar := strings.IndexByte(rest, '|')
	if bar < 0 || strings.IndexByte(rest[:bar], '\n') >= 0 || (len(rest)-bar-2)%2 != 0 {
		return Assignment{}, false
	}
	n := (len(rest) - bar - 2) / 2
	user := rest[bar+1 : bar+1+n]
	if rest[bar+1+n] != '\n' || rest[bar+2+n:] != user {
		return Assignment{}, false
	}
	return Assignment{Pool: f[0], JobID: f[1], Endpoint: f[2], Token: rest[:bar+1+n], User: user}, true
}

// Waiting implements SharedQueue.
func (s *ValkeyStore) Waiting(ctx context.Context, pool, user string) (int, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	n, err := s.client.Do(ctx, s.client.B().Zcard().Key(s.waitHead(pool)+user).Build()).AsInt64()
	if err != nil {
		return 0, s.wrap("count waiting jobs", err)
	}
	return int(n), nil
}

// PoolWaiting implements SharedQueue.
func (s *ValkeyStore) PoolWaiting(ctx context.Context, pool string) (int, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	n, err := s.client.Do(ctx, s.client.B().Zcard().Key(s.queueKeys(pool)[0]).Build()).AsInt64()
	if err != nil {
		return 0, s.wrap("count waiting users", err)
	}
	return int(n), nil
}

// QueueState implements SharedQueue.
func (s *ValkeyStore) QueueState(ctx context.Context, pool string, endpoints []string) (*QueueState, error) {
	ctx, cancel := s.bound(ctx)
	defer cancel()
	args := append([]string{s.waitHead(pool), strconv.FormatInt(time.Now().UnixMilli(), 10), s.prefix + "slots:"}, endpoints...)
	both, err := luaQueueState.Exec(ctx, s.client, s.queueKeys(pool)[:1], args).ToArray()
	if err == nil && len(both) != 2 {
		err = fmt.Errorf("unexpected reply of %d parts", len(both))
	}
	if err != nil {
		return nil, s.wrap("read queue of pool "+pool, err)
	}
	q, err := both[0].ToArray()
	if err != nil {
		return nil, s.wrap("read queue of pool "+pool, err)
	}
	st := &QueueState{Running: map[string]int{}}
	for i := 0; i+1 < len(q); i += 2 {
		m, _ := q[i].ToString()
		jobs, _ := q[i+1].AsStrSlice()
		if len(m) <= userOffset {
			continue
		}
		served, _ := strconv.ParseUint(m[11:31], 10, 64)
		st.Users = append(st.Users, QueuedUser{User: m[userOffset:], Priority: prioFromKey(m[:10]), Served: served, Jobs: jobs})
	}
	holders, _ := both[1].AsStrSlice()
	for _, h := range holders {
		if _, u, ok := strings.Cut(h, "|"); ok {
			st.Running[u]++
		}
	}
	return st, nil
}
