package dispatch

import "testing"

func TestInLine(t *testing.T) {
	for pos, want := range map[int]string{1: "next in line", 2: "2nd in line", 3: "3rd in line", 4: "4th in line",
		11: "11th in line", 12: "12th in line", 13: "13th in line", 21: "21st in line", 22: "22nd in line",
		23: "23rd in line", 101: "101st in line", 111: "111th in line", 112: "112th in line"} {
		if got := inLine(pos); got != want {
			t.Errorf("inLine(%d) = %q, want %q", pos, got, want)
		}
	}
}
