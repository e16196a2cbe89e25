package agent

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	"github.com/colo-runtime/colo/agentproto"
)

// ServeConfig configures "colo-agent serve".
type ServeConfig struct {
	// Channel is ChannelSerial or ChannelVsock.
	Channel string
	// Listen, "unix:/path", overrides Channel: the service then runs on
	// a unix socket, for development and tests on the host.
	Listen  string
	Service ServiceConfig
}

// Serve runs the agent service until ctx ends or the channel fails, then
// removes every container it created.
func Serve(ctx context.Context, cfg ServeConfig) (retErr error) {
	// No PR_SET_CHILD_SUBREAPER: libcontainer's nsexec spawns its stages
	// with CLONE_PARENT, so container init and exec processes are this
	// process's own children and libcontainer reaps them. As a subreaper
	// it would also inherit the orphans of containers that share the
	// guest's PID namespace, and only a wait(-1) loop, which would steal
	// libcontainer's exits, could reap them. Left alone, orphans go to
	// PID 1, which reaps everything.
	//
	// The guest OOM killer must pick a container, never the service
	// (PID 1 would power the guest off). The containers must not inherit
	// this: createContainer gives them their spec's value or 0.
	if err := protectFromOOM(); err != nil {
		log.G(ctx).WithError(err).Error("the guest OOM killer may pick the agent service")
	}
	// The debug console, if the VM has one (console.go); its shell is
	// killed when the service stops.
	defer startConsole(ctx, cfg)()
	// Port-forwarding to the guest's loopback, if the VM has the channel
	// (portforward.go).
	defer startPortForward(ctx, cfg)()
	svc, err := NewService(cfg.Service)
	if err != nil {
		return err
	}
	defer func() {
		// ctx has ended by now, but removal must still wait for the
		// killed processes.
		if err := svc.Close(context.WithoutCancel(ctx)); err != nil {
			retErr = errors.Join(retErr, fmt.Errorf("clean up containers: %w", err))
		}
	}()
	srv, err := ttrpc.NewServer(ttrpc.WithUnaryServerInterceptor(statusInterceptor))
	if err != nil {
		return err
	}
	defer srv.Close()
	agentproto.RegisterAgentService(srv, svc)

	l, err := listen(ctx, cfg.Channel, cfg.Listen)
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ctx, l) }()
	log.G(ctx).WithField("version", cfg.Service.Version).Infof("agent serving on %s", l.Addr())

	select {
	case err = <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
		log.G(ctx).Info("agent stopping")
		srv.Close()
		<-errc
		return nil
	}
}
