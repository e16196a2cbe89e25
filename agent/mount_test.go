package agent

import (
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseMountOptions(t *testing.T) {
	tests := []struct {
		options []string
		flags   uintptr
		data    string
	}{
		{nil, 0, ""},
		{[]string{"ro", "nosuid", "size=16m", "mode=0755"}, unix.MS_RDONLY | unix.MS_NOSUID, "size=16m,mode=0755"},
		{[]string{"ro", "rw"}, 0, ""},
		{[]string{"rbind", "nodev", ""}, unix.MS_BIND | unix.MS_REC | unix.MS_NODEV, ""},
		{[]string{"cache=loose", "defaults"}, 0, "cache=loose"},
	}
	for _, tt := range tests {
		flags, data := parseMountOptions(tt.options)
		if flags != tt.flags || data != tt.data {
			t.Errorf("parseMountOptions(%q) = %#x, %q; want %#x, %q", tt.options, flags, data, tt.flags, tt.data)
		}
	}
}
