package redirect

import (
	"flag"
	"io"
	"strings"
	"testing"
)

// Istio's injector's argument list, and Linkerd's, as their templates write
// them.
var (
	istioArgs   = []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}
	linkerdArgs = []string{"--incoming-proxy-port", "4143", "--outgoing-proxy-port", "4140", "--proxy-uid", "2102",
		"--inbound-ports-to-ignore", "4190,4191,4567,4568", "--outbound-ports-to-ignore", "4567,4568",
		"--firewall-bin-path", "iptables-nft", "--ipv6=false"}
)

// installPlan is the plan `sluice install` makes from args.
func installPlan(t *testing.T, args ...string) Plan {
	t.Helper()
	p := DefaultPolicy()
	fs := flag.NewFlagSet("install", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	p.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	plan, err := p.Plan()
	if err != nil {
		t.Fatal(err)
	}
	return plan
}

func noEnv(string) (string, bool) { return "", false }

func envOf(kv ...string) func(string) (string, bool) {
	return func(name string) (string, bool) {
		for i := 0; i < len(kv); i += 2 {
			if kv[i] == name {
				return kv[i+1], true
			}
		}
		return "", false
	}
}

func TestIstioPersonality(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		env  func(string) (string, bool)
		// install is the `sluice install` command line that means the same.
		install []string
		check   func(*testing.T, Invocation)
	}{
		{name: "injector's list", args: istioArgs, env: noEnv,
			install: []string{"-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "-i", "*", "-b", "*", "-d", "15090,15021,15020,15008"}},
		{name: "defaults capture nothing", args: nil, env: noEnv,
			install: []string{"-i", "", "-b", "", "-d", "15008"}},
		{name: "-g follows -u", args: []string{"-u", "2000", "-i", "*"}, env: noEnv,
			install: []string{"-u", "2000", "-g", "2000", "-b", "", "-d", "15008"}},
		{name: "long names, = syntax, last repeat wins", args: []string{"--envoy-port=15101", "--istio-service-cidr=198.18.0.0/15", "-x", "198.18.1.0/24", "-x", "198.18.2.0/24", "--istio-inbound-ports=8080", "-e", "15108"}, env: noEnv,
			install: []string{"-p", "15101", "-i", "198.18.0.0/15", "-x", "198.18.2.0/24", "-b", "8080", "-d", "15108"}},
		{name: "environment, overridden by flags", args: []string{"-z", "15106"},
			env:     envOf("INBOUND_CAPTURE_PORT", "15206", "ISTIO_SERVICE_CIDR", "*", "ISTIO_INBOUND_PORTS", "*", "PROXY_UID", "1400", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "22"),
			install: []string{"-z", "15106", "-u", "1400", "-g", "1400", "-i", "*", "-b", "*", "-o", "22", "-d", "15008"}},
		{name: "validation, netns, logging, ignored flags",
			args: []string{"--run-validation", "--skip-rule-apply", "--iptables-probe-port", "15102", "--probe-timeout", "2s",
				"--network-namespace", "/run/netns/p", "--log_output_level", "default:debug,ads:warn", "--log_as_json", "--cni-mode", "--dual-stack"},
			env:     envOf("INVALID_DROP", "true"),
			install: []string{"-i", "", "-b", "", "-d", "15008"},
			check: func(t *testing.T, inv Invocation) {
				if !inv.Validate || !inv.SkipApply || inv.ProbePort != 15102 || inv.ProbeTimeout.String() != "2s" ||
					inv.Netns != "/run/netns/p" || inv.LogLevel != "debug" || !inv.LogJSON {
					t.Errorf("invocation = %+v", inv)
				}
				if got := strings.Join(inv.Ignored, " "); got != "--drop-invalid=true --dual-stack=true --cni-mode=true" {
					t.Errorf("ignored = %q", got)
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inv, err := ParseIstio(tc.args, tc.env)
			if err != nil {
				t.Fatal(err)
			}
			got, err := inv.Policy.Plan()
			if err != nil {
				t.Fatal(err)
			}
			if want := installPlan(t, tc.install...); !got.Equal(want) {
				t.Errorf("plan\n got %+v\nwant %+v", got, want)
			}
			if tc.check != nil {
				tc.check(t, inv)
			}
		})
	}
}

func TestLinkerdPersonality(t *testing.T) {
	inv, err := ParseLinkerd(linkerdArgs)
	if err != nil {
		t.Fatal(err)
	}
	got, err := inv.Policy.Plan()
	if err != nil {
		t.Fatal(err)
	}
	want := installPlan(t, "--incoming-proxy-port", "4143", "--outgoing-proxy-port", "4140", "-u", "2102", "-g", "2102",
		"-d", "4190,4191,4567,4568", "-o", "4567,4568", "-x", "::/0")
	if !got.Equal(want) {
		t.Errorf("plan\n got %+v\nwant %+v", got, want)
	}
	if strings.Join(inv.Ignored, " ") != "--firewall-bin-path=iptables-nft" {
		t.Errorf("ignored = %q", inv.Ignored)
	}

	// Short flags mean the opposite of Istio's; ignore lists accumulate
	// over repeats and take ranges; -r limits inbound capture.
	inv, err = ParseLinkerd([]string{"-p", "4143", "-o", "4140", "-u", "2102", "--proxy-gid", "2103", "-r", "8080", "-r", "9090",
		"--inbound-ports-to-ignore", "4190-4191", "--inbound-ports-to-ignore", "4567", "--simulate", "--netns", "/run/netns/p", "--log-format", "json", "-w"})
	if err != nil {
		t.Fatal(err)
	}
	got, _ = inv.Policy.Plan()
	want = installPlan(t, "--incoming-proxy-port", "4143", "--outgoing-proxy-port", "4140", "-u", "2102", "-g", "2103",
		"-b", "8080,9090", "-d", "4190,4191,4567")
	if !got.Equal(want) {
		t.Errorf("plan\n got %+v\nwant %+v", got, want)
	}
	if !inv.DryRun || inv.Netns != "/run/netns/p" || !inv.LogJSON || inv.Policy.IncludeCIDRs.All != true {
		t.Errorf("invocation = %+v", inv)
	}
	if inv.Policy.ExcludeCIDRs.List != nil {
		t.Errorf("--ipv6 defaults to true, but IPv6 is excluded: %v", inv.Policy.ExcludeCIDRs.List)
	}
}

// DNS capture as istio-iptables takes it: --redirect-dns, or its
// variables REDIRECT_DNS and ISTIO_META_DNS_CAPTURE (what the sidecar
// injector sets), and --capture-all-dns (CAPTURE_ALL_DNS), which means
// nothing without it, as there.
func TestIstioDNSCapture(t *testing.T) {
	for _, tc := range []struct {
		args          []string
		env           func(string) (string, bool)
		redirect, all bool
	}{
		{[]string{"--redirect-dns"}, noEnv, true, false},
		{nil, envOf("ISTIO_META_DNS_CAPTURE", "true"), true, false},
		{nil, envOf("REDIRECT_DNS", "true"), true, false},
		{[]string{"--redirect-dns=false"}, envOf("ISTIO_META_DNS_CAPTURE", "true"), false, false},
		{[]string{"--redirect-dns", "--capture-all-dns"}, noEnv, true, true},
		{[]string{"--redirect-dns"}, envOf("CAPTURE_ALL_DNS", "true"), true, true},
		{[]string{"--capture-all-dns"}, noEnv, false, false},
	} {
		inv, err := ParseIstio(tc.args, tc.env)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if inv.Policy.RedirectDNS != tc.redirect || inv.Policy.CaptureAllDNS != tc.all || inv.Policy.DNSPort != DefaultDNSPort {
			t.Errorf("%v: redirect %v, all %v, port %d; want %v, %v, %d", tc.args, inv.Policy.RedirectDNS, inv.Policy.CaptureAllDNS,
				inv.Policy.DNSPort, tc.redirect, tc.all, DefaultDNSPort)
		}
	}
}

func TestMeshPersonalityBadInput(t *testing.T) {
	for _, tc := range []struct {
		tool string
		args []string
		env  func(string) (string, bool)
		want string
	}{
		{"istio", []string{"-m", "TPROXY"}, noEnv, "-m TPROXY is not supported"},
		{"istio", []string{"-m", "tproxy"}, noEnv, "-m TPROXY is not supported"},
		{"istio", []string{"-m", "NAT"}, noEnv, `-m "NAT": want REDIRECT`},
		{"istio", []string{"-k", "eth1"}, noEnv, "-k (kube-virt-interfaces) is not supported"},
		{"istio", []string{"-c", "eth1"}, noEnv, "-c (istio-exclude-interfaces) is not supported"},
		{"istio", []string{"-p", "0"}, noEnv, "port 0 is out of range"},
		{"istio", []string{"-x", "198.18.0.0/33"}, noEnv, "not a CIDR"},
		{"istio", []string{"-u", "istio-proxy"}, noEnv, "not a numeric uid"},
		{"istio", []string{"--bogus"}, noEnv, "unknown flag: --bogus"},
		{"istio", []string{"extra"}, noEnv, `unexpected argument "extra"`},
		{"istio", nil, envOf("INBOUND_CAPTURE_PORT", "x"), `environment INBOUND_CAPTURE_PORT="x"`},
		{"istio", []string{"--log_output_level", "default:loud"}, noEnv, `level "loud"`},
		{"linkerd", []string{"-o", "4140", "-u", "2102"}, nil, "--incoming-proxy-port must be a valid TCP port number"},
		{"linkerd", []string{"-p", "4143", "-o", "70000", "-u", "2102"}, nil, "--outgoing-proxy-port must be a valid TCP port number"},
		{"linkerd", []string{"-p", "4143", "-o", "4140"}, nil, "--proxy-uid is required"},
		{"linkerd", []string{"-p", "4143", "-o", "4140", "-u", "2102", "--subnets-to-ignore", "198.18.0.0/16"}, nil, "--subnets-to-ignore is not supported"},
		{"linkerd", []string{"-p", "4143", "-o", "4140", "-u", "2102", "--inbound-ports-to-ignore", "5-1"}, nil, "runs backwards"},
		{"linkerd", []string{"-p", "4143", "-o", "4140", "-u", "2102", "--log-format", "xml"}, nil, "want plain or json"},
		{"linkerd", []string{"-p", "x"}, nil, `invalid argument "x"`},
	} {
		t.Run(strings.Join(append([]string{tc.tool}, tc.args...), " "), func(t *testing.T) {
			var err error
			if tc.tool == "istio" {
				_, err = ParseIstio(tc.args, tc.env)
			} else {
				_, err = ParseLinkerd(tc.args)
			}
			if err == nil {
				t.Fatalf("accepted; want an error containing %q", tc.want)
			}
			if msg := err.Error(); !strings.Contains(msg, tc.want) || strings.Contains(msg, "\n") {
				t.Errorf("error %q: want one line containing %q", msg, tc.want)
			}
		})
	}
}
