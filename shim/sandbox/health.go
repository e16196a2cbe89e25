package sandbox

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/log"

	"github.com/colo-runtime/colo/agentproto"
)

// The sandbox is watched for what it needs to run: the VM process, the
// agent connection, the agent answering, and virtiofsd. Losing any of them
// while the sandbox is up fails it (fail): every process exits with
// VMExitStatus and everything is torn down, so that nothing is left half
// alive, waiting on a guest that will not answer.

// timeouts are the agent call bounds of the configuration.
func (s *Sandbox) timeouts() agentTimeouts {
	return agentTimeouts{
		call:   time.Duration(s.cfg.Agent.CallTimeout),
		create: time.Duration(s.cfg.Agent.CreateTimeout),
		observe: func(method string, d time.Duration) {
			s.agentRPC.WithLabelValues(method).Observe(d.Seconds())
		},
	}
}

// fail declares the sandbox failed: the reason is logged with the guest
// console's last lines, pending agent calls fail, every process exits with
// VMExitStatus and the VM and the rest are torn down. Only the first of
// fail and teardown acts: a sandbox being shut down does not fail.
func (s *Sandbox) fail(reason error) {
	first := false
	s.stopOnce.Do(func() {
		close(s.stopping)
		first = true
	})
	if !first {
		return
	}
	ctx := s.ctx
	entry := log.G(ctx).WithError(reason)
	if s.vm != nil {
		entry = entry.WithField("console", s.vm.Console())
	}
	entry.Error("sandbox failed: its processes exit and it is torn down")
	// Pending agent calls (waits, stdio) fail now; their processes exit
	// with VMExitStatus.
	if s.agent != nil {
		s.agent.Close()
	}
	s.endUnwaited()
	if err := s.teardown(ctx); err != nil {
		log.G(ctx).WithError(err).Error("tear down a failed sandbox")
	}
}

// agentLost is called when the agent connection is gone, closed by either
// side; it fails a sandbox that is up and not stopping.
func (s *Sandbox) agentLost() {
	if !s.up.Load() {
		return
	}
	s.fail(errors.New("the connection to the agent was lost"))
}

// watchHealth checks that the agent answers, every agent.health_interval,
// and fails the sandbox after agent.health_failures checks in a row
// without an answer. A guest that answers again before that recovers.
func (s *Sandbox) watchHealth() {
	interval := time.Duration(s.cfg.Agent.HealthInterval)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	missed := 0
	for {
		select {
		case <-s.stopping:
			return
		case <-s.vm.Panicked():
			// Paused for its vmcore; watchPanic fails the sandbox.
			return
		case <-tick.C:
		}
		ctx, cancel := context.WithTimeout(s.ctx, time.Duration(s.cfg.Agent.CallTimeout))
		_, err := s.agent.Check(ctx, &agentproto.CheckRequest{})
		cancel()
		if err != nil && s.dumping.Load() > 0 {
			// Paused while a vmcore is written (dump.go).
			continue
		}
		if err == nil {
			if missed > 0 {
				log.G(s.ctx).WithField("missed", missed).Warn("agent answers again")
			}
			missed = 0
			continue
		}
		missed++
		log.G(s.ctx).WithError(agentError("Check", err)).WithField("missed", missed).Warn("agent health check")
		if missed >= s.cfg.Agent.HealthFailures {
			s.fail(fmt.Errorf("the agent did not answer %d health checks in a row (agent.health_interval %s, agent.health_failures %d): %w",
				missed, interval, s.cfg.Agent.HealthFailures, agentError("Check", err)))
			return
		}
	}
}

// watchVirtiofsd fails the sandbox if virtiofsd exits: the guest's files
// are gone with it.
func (s *Sandbox) watchVirtiofsd() {
	select {
	case <-s.stopping:
	case <-s.virtiofsd.Done():
		s.fail(fmt.Errorf("virtiofsd exited: %w", s.virtiofsd.Err()))
	}
}

// endUnwaited ends the processes no wait will end (those never started),
// once the guest is gone: with VMExitStatus.
func (s *Sandbox) endUnwaited() {
	s.mu.Lock()
	var ps []*process
	for _, c := range s.containers {
		ps = append(ps, c.processes()...)
	}
	s.mu.Unlock()
	for _, p := range ps {
		p.vmDied()
	}
}
