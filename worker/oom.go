package worker

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// How an out-of-memory kill is told apart: the kernel counts the
// processes its OOM killer ended in each memory cgroup, in the "oom_kill"
// line of memory.events (cgroup v2) or memory.oom_control (cgroup v1,
// kernel 4.13+). The supervisor reads the count of the cgroup it runs in
// (ComfyUI's, unless something moved it) when it starts ComfyUI; if
// ComfyUI then dies of SIGKILL that comfyume did not send and the count
// rose, the kernel's OOM killer ended it. Without a readable count (no
// memory controller, another OS) a SIGKILL nobody sent is reported as
// such, naming the OOM killer as the likely cause.

// oomKillCount reads the OOM kill count of this process's memory cgroup.
func oomKillCount() (int64, bool) {
	for _, f := range memoryCgroupFiles("/proc/self/cgroup", "/sys/fs/cgroup") {
		if b, err := os.ReadFile(f); err == nil {
			if n, ok := parseOOMKill(b); ok {
				return n, true
			}
		}
	}
	return 0, false
}

// memoryCgroupFiles lists the files that may hold the OOM kill count of
// the cgroups named in a /proc/<pid>/cgroup file, best first.
func memoryCgroupFiles(procCgroup, root string) []string {
	b, err := os.ReadFile(procCgroup)
	if err != nil {
		return nil
	}
	var v2, v1 []string
	for _, line := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || !strings.HasPrefix(parts[2], "/") {
			continue
		}
		path := filepath.Clean(parts[2])
		switch {
		case parts[0] == "0" && parts[1] == "":
			v2 = append(v2, filepath.Join(root, path, "memory.events"))
		case hasController(parts[1], "memory"):
			v1 = append(v1, filepath.Join(root, "memory", path, "memory.oom_control"))
		}
	}
	return append(v2, v1...)
}

func hasController(list, name string) bool {
	for _, c := range strings.Split(list, ",") {
		if c == name {
			return true
		}
	}
	return false
}

// parseOOMKill reads the "oom_kill N" line of memory.events or
// memory.oom_control.
func parseOOMKill(b []byte) (int64, bool) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == "oom_kill" {
			n, err := strconv.ParseInt(f[1], 10, 64)
			return n, err == nil && n >= 0
		}
	}
	return 0, false
}
