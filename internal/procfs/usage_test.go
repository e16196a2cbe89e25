package procfs

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

func TestReadUsage(t *testing.T) {
	u, err := ReadUsage(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if u.Threads < 1 || u.RSS == 0 || u.FDs < 3 || u.UTime+u.STime == 0 && u.RSS == 0 {
		t.Errorf("usage of this process = %+v", u)
	}
	if _, err := ReadUsage(1 << 30); err == nil {
		t.Error("usage of a process that does not exist: no error")
	}
}

func TestReadSchedstat(t *testing.T) {
	st, err := ReadSchedstat(os.Getpid(), unix.Gettid())
	if err != nil {
		t.Fatal(err)
	}
	if st.Run <= 0 || st.Slices == 0 {
		t.Errorf("schedstat of this thread = %+v, want some run time", st)
	}
}
