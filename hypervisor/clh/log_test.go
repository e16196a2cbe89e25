package clh

import (
	"context"

	"github.com/containerd/log"
)

func testLogger() *log.Entry { return log.G(context.Background()) }
