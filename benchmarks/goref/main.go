// Command goref is the Go reference DRA kubelet plugin that benchmarks/compare.py measures
// dra-core against. It is built on k8s.io/dynamic-resource-allocation: the kubeletplugin
// helper serves the kubelet's sockets and reads each claim from the API server, and the
// resourceslice controller behind Helper.PublishResources publishes the devices.
//
// Per claim it does what dra-core's fake backend does: check the devices allocated to it
// (this driver, this node's pool, not held by another claim), write one CDI spec for the
// claim with the official CDI library, and record the claim in a checkpoint file (JSON with a
// checksum, written to a temp file, fsynced, renamed over the old one, directory fsynced).
// It publishes N plain devices dev-0 .. dev-<N-1> (attributes model and index, 1Gi memory),
// like `dra-core run --backend fake --devices N`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/klog/v2"
	cdiapi "tags.cncf.io/container-device-interface/pkg/cdi"
)

type config struct {
	kubeconfig      string
	nodeName        string
	driverName      string
	cdiVendor       string
	cdiClass        string
	devices         int
	registrationDir string
	pluginsDir      string
	cdiDir          string
	qps             float64
	burst           int
}

func main() {
	var c config
	flag.StringVar(&c.kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster)")
	flag.StringVar(&c.nodeName, "node-name", os.Getenv("NODE_NAME"), "the node this plugin serves (its pool name)")
	flag.StringVar(&c.driverName, "driver-name", "goref.dra-core.dev", "DRA driver name")
	flag.StringVar(&c.cdiVendor, "cdi-vendor", "dra-core.dev", "CDI vendor of the claim specs")
	flag.StringVar(&c.cdiClass, "cdi-class", "goref", "CDI class of the claim specs")
	flag.IntVar(&c.devices, "devices", 8, "publish this many plain devices dev-0 .. dev-<N-1>")
	flag.StringVar(&c.registrationDir, "registration-dir", kubeletplugin.KubeletRegistryDir, "the kubelet's plugin registration directory")
	flag.StringVar(&c.pluginsDir, "plugins-dir", kubeletplugin.KubeletPluginsDir, "parent of the driver's socket and checkpoint directory")
	flag.StringVar(&c.cdiDir, "cdi-dir", cdiapi.DefaultDynamicDir, "directory of the per-claim CDI specs")
	// client-go throttles a client to 5 requests/s with bursts of 10 unless told otherwise;
	// a prepare storm would then measure the limiter, not the driver.
	flag.Float64Var(&c.qps, "kube-api-qps", 1000, "client-side rate limit of API requests (requests/s)")
	flag.IntVar(&c.burst, "kube-api-burst", 1000, "client-side burst of API requests")
	klog.InitFlags(nil)
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := run(ctx, c); err != nil {
		klog.ErrorS(err, "goref failed")
		klog.Flush()
		os.Exit(1)
	}
	klog.Flush()
}

func restConfig(c config) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	if c.kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", c.kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, err
	}
	cfg.QPS = float32(c.qps)
	cfg.Burst = c.burst
	cfg.UserAgent = "goref/" + c.nodeName
	return cfg, nil
}

func run(ctx context.Context, c config) error {
	if c.nodeName == "" {
		return errors.New("--node-name (or NODE_NAME) is required")
	}
	if c.devices < 0 {
		return fmt.Errorf("--devices %d: want a count >= 0", c.devices)
	}
	cfg, err := restConfig(c)
	if err != nil {
		return fmt.Errorf("client configuration: %w", err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("client: %w", err)
	}

	dataDir := filepath.Join(c.pluginsDir, c.driverName)
	if err := os.MkdirAll(dataDir, 0o750); err != nil {
		return err
	}
	if err := os.MkdirAll(c.cdiDir, 0o755); err != nil {
		return err
	}
	checkpoint, err := openCheckpoint(filepath.Join(dataDir, "checkpoint.json"))
	if err != nil {
		return err
	}
	cdi, err := cdiapi.NewCache(cdiapi.WithSpecDirs(c.cdiDir), cdiapi.WithAutoRefresh(false))
	if err != nil {
		return fmt.Errorf("CDI cache: %w", err)
	}

	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	drv := newDriver(c, cdi, checkpoint, cancel)

	helper, err := kubeletplugin.Start(ctx, drv,
		kubeletplugin.DriverName(c.driverName),
		kubeletplugin.NodeName(c.nodeName),
		kubeletplugin.KubeClient(client),
		kubeletplugin.RegistrarDirectoryPath(c.registrationDir),
		kubeletplugin.PluginDataDirectoryPath(dataDir),
		kubeletplugin.HealthService(false),
	)
	if err != nil {
		return fmt.Errorf("start the kubelet plugin: %w", err)
	}
	defer helper.Stop()

	if err := helper.PublishResources(ctx, drv.resources()); err != nil {
		return fmt.Errorf("publish resources: %w", err)
	}
	klog.InfoS("goref started", "driver", c.driverName, "node", c.nodeName, "devices", c.devices,
		"claimsInCheckpoint", checkpoint.len(), "qps", c.qps, "burst", c.burst)

	<-ctx.Done()
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
		return cause
	}
	return nil
}
