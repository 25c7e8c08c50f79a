package worker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// A Supervisor runs ComfyUI as a child process of the worker, so that a
// GPU container is "any ComfyUI image + the comfyume binary as its
// entrypoint":
//
//   - the command runs in a process group of its own, with the worker's
//     environment plus SupervisorSpec.Env;
//   - it is ready once GET <URL>/system_stats answers 200 (polled); until
//     then the worker answers its status and job requests with 503;
//   - its stdout and stderr go to the log line by line (a line longer
//     than MaxLogLine is cut; a carriage return starts the line over, as
//     on a terminal, so progress bars log their last state);
//   - when it exits it is started again, after a wait that doubles from
//     RestartMin up to RestartMax (back to RestartMin once it ran ready
//     for RestartMax);
//   - a job running when it exits ends with an error that says why (Exit);
//   - Stop sends SIGTERM to the group, then SIGKILL after StopTimeout.
type Supervisor struct {
	log *zap.Logger
	hc  *http.Client

	mu       sync.Mutex
	spec     SupervisorSpec
	cur      *life
	state    string
	restarts int
	last     *Exit
	started  bool
	stopping bool

	// restart asks the run loop to end the current ComfyUI and start the
	// (updated) spec at once.
	restart chan struct{}
	stop    chan struct{}
	done    chan struct{}

	// oomKills reads the kernel's count of OOM kills (tests replace it).
	oomKills func() (int64, bool)
}

// SupervisorSpec is what a Supervisor runs.
type SupervisorSpec struct {
	// Command is the program and its arguments (required).
	Command []string
	// Dir is the working directory (default: the worker's).
	Dir string
	// Env holds "KEY=value" entries added to the worker's environment.
	Env []string
	// URL is the ComfyUI the command serves (e.g. http://127.0.0.1:8188).
	URL string
	// RestartMin and RestartMax bound the wait before a restart (default
	// 1s and 1m).
	RestartMin, RestartMax time.Duration
	// StopTimeout is how long ComfyUI has to exit after SIGTERM before it
	// gets SIGKILL (default 10s).
	StopTimeout time.Duration
	// ReadyTimeout is how long a starting ComfyUI may take to answer
	// before it is stopped and started again (default 10m).
	ReadyTimeout time.Duration
}

// Defaults of SupervisorSpec.
const (
	DefaultRestartMin   = time.Second
	DefaultRestartMax   = time.Minute
	DefaultStopTimeout  = 10 * time.Second
	DefaultReadyTimeout = 10 * time.Minute
)

// Bounds of what a Supervisor keeps of ComfyUI's output.
const (
	// MaxLogLine is the longest line logged; the rest is dropped.
	MaxLogLine = 8 << 10
	// TailLines and TailBytes bound the last lines kept for Exit.Tail.
	TailLines = 20
	TailBytes = 4 << 10
	// tailLine bounds one line of the tail.
	tailLine = 1 << 10
)

const (
	pollEvery   = 250 * time.Millisecond
	probeTime   = 2 * time.Second
	drainOutput = 2 * time.Second
)

// Supervisor states (ChildStatus.State).
const (
	StateStarting   = "starting"
	StateReady      = "ready"
	StateRestarting = "restarting"
	StateStopped    = "stopped"
)

func (sp SupervisorSpec) withDefaults() SupervisorSpec {
	if sp.RestartMin <= 0 {
		sp.RestartMin = DefaultRestartMin
	}
	if sp.RestartMax <= 0 {
		sp.RestartMax = DefaultRestartMax
	}
	if sp.RestartMax < sp.RestartMin {
		sp.RestartMax = sp.RestartMin
	}
	if sp.StopTimeout <= 0 {
		sp.StopTimeout = DefaultStopTimeout
	}
	if sp.ReadyTimeout <= 0 {
		sp.ReadyTimeout = DefaultReadyTimeout
	}
	sp.URL = strings.TrimRight(sp.URL, "/")
	return sp
}

// Equal reports whether two specs run the same thing the same way.
func (sp SupervisorSpec) Equal(o SupervisorSpec) bool {
	a, b := sp.withDefaults(), o.withDefaults()
	return slices.Equal(a.Command, b.Command) && a.Dir == b.Dir && slices.Equal(a.Env, b.Env) && a.URL == b.URL &&
		a.RestartMin == b.RestartMin && a.RestartMax == b.RestartMax && a.StopTimeout == b.StopTimeout && a.ReadyTimeout == b.ReadyTimeout
}

// NewSupervisor returns a supervisor that logs to logger (nil: nowhere).
// Nothing runs until Start.
func NewSupervisor(logger *zap.Logger) *Supervisor {
	if logger == nil {
		logger = zap.NewNop()
	}
	return &Supervisor{
		log: logger, hc: &http.Client{Timeout: probeTime}, state: StateStopped,
		restart: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{}),
		oomKills: oomKillCount,
	}
}

// Start runs spec. On a running supervisor, a different spec replaces the
// running ComfyUI at once (a job running then ends with an error saying
// so); the same spec changes nothing.
func (s *Supervisor) Start(spec SupervisorSpec) error {
	if len(spec.Command) == 0 || spec.Command[0] == "" {
		return errors.New("no command to run")
	}
	spec = spec.withDefaults()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopping {
		return errors.New("the supervisor was stopped")
	}
	if !s.started {
		s.started, s.spec, s.state = true, spec, StateStarting
		go s.run()
		return nil
	}
	if s.spec.Equal(spec) {
		return nil
	}
	s.log.Info("the ComfyUI command changed; restarting it", zap.Strings("command", spec.Command))
	s.spec = spec
	select {
	case s.restart <- struct{}{}:
	default:
	}
	return nil
}

// Stop ends ComfyUI (SIGTERM to its process group, SIGKILL after the stop
// timeout) and returns once it is gone. A job running then ends with an
// error saying so.
func (s *Supervisor) Stop() {
	s.mu.Lock()
	started := s.started
	if !s.stopping {
		s.stopping = true
		close(s.stop)
	}
	s.mu.Unlock()
	if started {
		<-s.done
	}
}

// Ready reports whether ComfyUI runs and answered.
func (s *Supervisor) Ready() bool {
	s.mu.Lock()
	l := s.cur
	s.mu.Unlock()
	return l != nil && l.ready.Load() && !l.ended()
}

// ChildStatus is the supervisor's part of the worker's GET answer.
type ChildStatus struct {
	// State is starting, ready, restarting or stopped.
	State string `json:"state"`
	// PID is the running ComfyUI's process id.
	PID int `json:"pid,omitempty"`
	// Restarts counts the times ComfyUI was started again.
	Restarts int `json:"restarts"`
	// LastExit says why ComfyUI last ended (without its output).
	LastExit string `json:"last_exit,omitempty"`
}

// Status reports the supervisor's state.
func (s *Supervisor) Status() ChildStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := ChildStatus{State: s.state, Restarts: s.restarts}
	if s.cur != nil && !s.cur.ended() {
		st.PID = s.cur.pid
	}
	if s.last != nil {
		st.LastExit = s.last.Reason()
	}
	return st
}

// current is the ComfyUI running now, or nil.
func (s *Supervisor) current() *life {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur
}

// Exit says how a ComfyUI process ended.
type Exit struct {
	// Code is the exit status, or -1 when a signal ended the process.
	Code int
	// Signal names the signal that ended it ("SIGKILL"), if any.
	Signal string
	// OOM: the kernel's out-of-memory killer ended it (the kernel's count
	// of OOM kills in the worker's memory cgroup rose meanwhile).
	OOM bool
	// Why is set when comfyume ended it (stopping, restarting, not ready
	// in time).
	Why string
	// StartError is set when the command could not be started.
	StartError string
	// Tail is the last lines it printed (at most TailLines, TailBytes).
	Tail []string
	// TailFrom is the number of lines it printed before Tail[0].
	TailFrom int64
}

// Reason is one line: how ComfyUI ended.
func (e *Exit) Reason() string {
	if e.StartError != "" {
		return "ComfyUI could not be started: " + e.StartError
	}
	var b strings.Builder
	switch {
	case e.Signal != "":
		fmt.Fprintf(&b, "ComfyUI was killed by signal %s", e.Signal)
	default:
		fmt.Fprintf(&b, "ComfyUI exited with code %d", e.Code)
	}
	switch {
	case e.OOM:
		b.WriteString(": out of memory (the kernel's OOM killer ended it)")
	case e.Why != "":
		b.WriteString(" (" + e.Why + ")")
	case e.Signal == "SIGKILL":
		b.WriteString(" (not sent by comfyume: the kernel's out-of-memory killer, or the container runtime)")
	}
	return b.String()
}

// Message is Reason followed by the last lines ComfyUI printed.
func (e *Exit) Message() string { return e.MessageSince(0) }

// MessageSince is Reason followed by the last lines ComfyUI printed after
// its first n lines: a job is told only what was printed while it ran,
// not the lines of an earlier job (another user's).
func (e *Exit) MessageSince(n int64) string {
	lines := e.Tail
	if skip := n - e.TailFrom; skip > 0 {
		lines = lines[min(int(skip), len(lines)):]
	}
	if len(lines) == 0 {
		return e.Reason()
	}
	return e.Reason() + "; its last lines:\n" + strings.Join(lines, "\n")
}

// life is one run of the command.
type life struct {
	pid     int
	cmd     *exec.Cmd
	start   time.Time
	ready   atomic.Bool
	done    chan struct{} // closed once exit is set
	exit    *Exit
	tail    tail
	oomBase int64
	oomOK   bool
	killed  atomic.Value // string: why comfyume signalled it
}

func (l *life) ended() bool {
	select {
	case <-l.done:
		return true
	default:
		return false
	}
}

func (s *Supervisor) setState(state string) {
	s.mu.Lock()
	s.state = state
	s.mu.Unlock()
}

func (s *Supervisor) run() {
	defer close(s.done)
	defer s.setState(StateStopped)
	var delay time.Duration
	for {
		s.mu.Lock()
		spec := s.spec
		s.mu.Unlock()
		l := s.runOnce(spec)
		s.mu.Lock()
		s.last = l.exit
		stopping := s.stopping
		s.mu.Unlock()
		if stopping {
			return
		}
		restartNow := false
		select {
		case <-s.restart:
			restartNow = true
		default:
		}
		switch {
		case restartNow:
			delay = 0
		case l.ready.Load() && time.Since(l.start) >= spec.RestartMax:
			delay = spec.RestartMin
		case delay == 0:
			delay = spec.RestartMin
		default:
			delay = min(delay*2, spec.RestartMax)
		}
		if !restartNow {
			s.log.Warn("ComfyUI ended; starting it again", zap.String("reason", l.exit.Reason()), zap.Duration("in", delay))
			s.setState(StateRestarting)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-s.restart:
				t.Stop()
			case <-s.stop:
				t.Stop()
				return
			}
		}
		s.mu.Lock()
		s.restarts++
		s.state = StateStarting
		s.mu.Unlock()
	}
}

// runOnce starts the command and watches it until it ended.
func (s *Supervisor) runOnce(spec SupervisorSpec) *life {
	l := &life{done: make(chan struct{})}
	fail := func(err error) *life {
		s.log.Error("cannot start ComfyUI", zap.Strings("command", spec.Command), zap.Error(err))
		l.exit = &Exit{Code: -1, StartError: err.Error()}
		close(l.done)
		s.mu.Lock()
		s.cur = l
		s.mu.Unlock()
		return l
	}
	cmd := exec.Command(program(spec), spec.Command[1:]...)
	cmd.Dir = spec.Dir
	cmd.Env = append(os.Environ(), spec.Env...)
	ownGroup(cmd)
	outR, outW, err := os.Pipe()
	if err != nil {
		return fail(err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return fail(err)
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	l.oomBase, l.oomOK = s.oomKills()
	err = cmd.Start()
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return fail(err)
	}
	l.cmd, l.pid, l.start = cmd, cmd.Process.Pid, time.Now()
	log := s.log.With(zap.Int("pid", l.pid))
	log.Info("started ComfyUI", zap.Strings("command", spec.Command), zap.String("dir", spec.Dir))
	s.mu.Lock()
	s.cur = l
	s.mu.Unlock()

	var relays sync.WaitGroup
	relays.Add(2)
	go func() { defer relays.Done(); relayLines(outR, log.With(zap.String("stream", "stdout")), &l.tail) }()
	go func() { defer relays.Done(); relayLines(errR, log.With(zap.String("stream", "stderr")), &l.tail) }()
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()

	poll := time.NewTicker(pollEvery)
	defer poll.Stop()
	readyBy := time.NewTimer(spec.ReadyTimeout)
	defer readyBy.Stop()
	stop, restart := s.stop, s.restart
	var werr error
wait:
	for {
		select {
		case werr = <-waited:
			break wait
		case <-poll.C:
			if s.probe(spec.URL) {
				l.ready.Store(true)
				s.setState(StateReady)
				log.Info("ComfyUI is ready", zap.Duration("after", time.Since(l.start).Round(time.Millisecond)))
				poll.Stop()
				readyBy.Stop()
			}
		case <-readyBy.C:
			log.Error("ComfyUI did not answer in time; stopping it", zap.Duration("ready_timeout", spec.ReadyTimeout))
			go s.terminate(l, fmt.Sprintf("stopped by comfyume: not ready after %v", spec.ReadyTimeout), spec.StopTimeout)
		case <-stop:
			stop = nil
			go s.terminate(l, "stopped by comfyume: Caddy is stopping", spec.StopTimeout)
		case <-restart:
			restart = nil
			// Let run see the request once this ComfyUI is gone.
			select {
			case s.restart <- struct{}{}:
			default:
			}
			go s.terminate(l, "stopped by comfyume: the configuration changed its command", spec.StopTimeout)
		}
	}
	// Whatever the command left behind in its group goes too.
	killGroup(l.pid)
	drained := make(chan struct{})
	go func() { relays.Wait(); close(drained) }()
	t := time.NewTimer(drainOutput)
	select {
	case <-drained:
	case <-t.C:
		// A process that left the group still holds the pipes.
	}
	t.Stop()
	outR.Close()
	errR.Close()
	<-drained

	ex := &Exit{Code: cmd.ProcessState.ExitCode()}
	ex.Tail, ex.TailFrom = l.tail.lines()
	if why, ok := l.killed.Load().(string); ok {
		ex.Why = why
	}
	if sig, ok := exitSignal(cmd.ProcessState); ok {
		ex.Signal = sig
		if sig == "SIGKILL" && ex.Why == "" && l.oomOK {
			if n, ok := s.oomKills(); ok && n > l.oomBase {
				ex.OOM = true
			}
		}
	}
	if werr != nil && cmd.ProcessState == nil {
		ex.Why = werr.Error()
	}
	l.exit = ex
	close(l.done)
	log.Warn("ComfyUI ended", zap.String("reason", ex.Reason()), zap.Duration("ran", time.Since(l.start).Round(time.Millisecond)))
	return l
}

// program is the command's program, looked up in the PATH of the
// command's environment when Env sets one (exec.Command looks in the
// worker's).
func program(spec SupervisorSpec) string {
	name := spec.Command[0]
	if strings.ContainsRune(name, '/') || strings.ContainsRune(name, os.PathSeparator) {
		return name
	}
	var path string
	found := false
	for _, kv := range spec.Env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path, found = v, true
		}
	}
	if !found {
		return name
	}
	for _, dir := range filepath.SplitList(path) {
		if !filepath.IsAbs(dir) {
			continue
		}
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	return name
}

// terminate ends l: SIGTERM to its group, SIGKILL after timeout.
func (s *Supervisor) terminate(l *life, why string, timeout time.Duration) {
	l.killed.CompareAndSwap(nil, why)
	signalGroup(l.pid, false)
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-l.done:
	case <-t.C:
		s.log.Warn("ComfyUI did not exit after SIGTERM; killing it", zap.Int("pid", l.pid), zap.Duration("stop_timeout", timeout))
		signalGroup(l.pid, true)
	}
}

func (s *Supervisor) probe(base string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), probeTime)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/system_stats", nil)
	if err != nil {
		return false
	}
	resp, err := s.hc.Do(req)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// ---- output ----

// tail keeps the last lines of a process's output, bounded.
type tail struct {
	mu      sync.Mutex
	buf     []string
	bytes   int
	dropped int64 // lines that left buf
}

func (t *tail) add(line string) {
	if len(line) > tailLine {
		line = line[:tailLine] + "…"
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, line)
	t.bytes += len(line)
	for len(t.buf) > TailLines || (t.bytes > TailBytes && len(t.buf) > 1) {
		t.bytes -= len(t.buf[0])
		t.buf = t.buf[1:]
		t.dropped++
	}
}

// lines returns the lines kept and the number of lines before them.
func (t *tail) lines() ([]string, int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.buf), t.dropped
}

// count is the number of lines read so far.
func (t *tail) count() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.dropped + int64(len(t.buf))
}

// lineSplitter cuts a byte stream into lines: "\n" ends a line (a "\r"
// before it is dropped); a lone "\r" starts the line over, as on a
// terminal. A line is kept to max bytes; Cut counts what was dropped.
type lineSplitter struct {
	max  int
	line []byte
	cut  int
	cr   bool
	emit func(line []byte, cut int)
}

func (ls *lineSplitter) write(p []byte) {
	for _, c := range p {
		if ls.cr {
			ls.cr = false
			if c != '\n' {
				ls.line, ls.cut = ls.line[:0], 0
			}
		}
		switch c {
		case '\n':
			ls.flush()
		case '\r':
			ls.cr = true
		default:
			if len(ls.line) < ls.max {
				ls.line = append(ls.line, c)
			} else {
				ls.cut++
			}
		}
	}
}

// flush emits the line being read, if any.
func (ls *lineSplitter) flush() {
	if len(ls.line) > 0 || ls.cut > 0 {
		ls.emit(ls.line, ls.cut)
	}
	ls.line, ls.cut = ls.line[:0], 0
}

// relayLines logs every line read from r and keeps the last ones in t.
func relayLines(r io.Reader, log *zap.Logger, t *tail) {
	ls := &lineSplitter{max: MaxLogLine, emit: func(line []byte, cut int) {
		s := strings.ToValidUTF8(string(line), "\uFFFD")
		t.add(s)
		if cut > 0 {
			log.Info(s, zap.Int("bytes_dropped", cut))
		} else {
			log.Info(s)
		}
	}}
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		ls.write(buf[:n])
		if err != nil {
			ls.flush()
			return
		}
	}
}
