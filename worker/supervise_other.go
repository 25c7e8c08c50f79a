//go:build !unix

package worker

import (
	"os"
	"os/exec"
)

// Without process groups, only the command itself is signalled.

func ownGroup(*exec.Cmd) {}

func signalGroup(pid int, _ bool) {
	if p, err := os.FindProcess(pid); err == nil {
		_ = p.Kill()
	}
}

func killGroup(int) {}

func exitSignal(*os.ProcessState) (string, bool) { return "", false }
