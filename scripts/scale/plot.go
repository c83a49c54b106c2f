package main

import (
	"fmt"
	"image/color"
	"io"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

func (s *Series) print(w io.Writer) {
	if len(s.Pods) > 0 {
		fmt.Fprintf(w, "\n| pods on the node | sluice install p50 / p90 ms | iptables-restore p50 / p90 ms | ratio p50 | sluice KiB per idle pod | sluice node state MiB (shared) | iptables KiB per netns |\n| --- | --- | --- | --- | --- | --- | --- |\n")
		for _, p := range s.Pods {
			fmt.Fprintf(w, "| %d | %.1f / %.1f | %.1f / %.1f | %.2f | %.0f | %.1f | %.0f |\n", p.Pods, p.InstallMedianMs, p.InstallP90Ms, p.IPTablesMedianMs, p.IPTablesP90Ms, p.Ratio, p.IdlePodKiB, p.NodeStateMiB, p.IPTablesNetnsKiB)
		}
	}
	if len(s.CIDRs) > 0 {
		fmt.Fprintf(w, "\n| excluded CIDRs | sluice conn/s | iptables conn/s | ratio |\n| --- | --- | --- | --- |\n")
		for _, p := range s.CIDRs {
			fmt.Fprintf(w, "| %d | %.0f | %.0f | %.2f |\n", p.CIDRs, p.SluiceConnPerS, p.IPTablesConnPerS, p.SluiceConnPerS/p.IPTablesConnPerS)
		}
	}
	if len(s.Held) > 0 {
		fmt.Fprintf(w, "\n| held connections | sluice reached | sluice KiB (maps + socket storage) | sluice conn/s before -> held | iptables reached | iptables conntrack entries (KiB) | iptables conn/s before -> held |\n| --- | --- | --- | --- | --- | --- | --- |\n")
		for _, p := range s.Held {
			fmt.Fprintf(w, "| %d | %d | %.0f + %.0f | %.0f -> %.0f | %d | %d (%.0f) | %.0f -> %.0f |\n", p.Conns, p.SluiceReached, p.SluiceMapsKiB, p.SluiceSocketKiB,
				p.SluiceConnPerS0, p.SluiceConnPerS, p.IPTablesReached, p.ConntrackEntries, p.ConntrackKiB, p.IPTablesConnPerS0, p.IPTablesConnPerS)
		}
	}
	if len(s.Routes) > 0 {
		fmt.Fprintf(w, "\n| canary routes (sluice only: iptables has none) | connect p50 us | p90 us | first byte p50 us |\n| --- | --- | --- | --- |\n")
		for _, p := range s.Routes {
			fmt.Fprintf(w, "| %d | %.0f | %.0f | %.0f |\n", p.Routes, p.ConnectP50us, p.ConnectP90us, p.FirstP50us)
		}
	}
	for _, n := range s.Notes {
		fmt.Fprintf(w, "\nnote: %s\n", n)
	}
}

var (
	sluiceColor   = color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 255}
	iptablesColor = color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 255}
	thirdColor    = color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 255}
)

type line struct {
	name  string
	color color.Color
	dash  bool
	pts   plotter.XYs
}

// chart draws lines on one plot into path.
func chart(path, title, x, y string, logX bool, lines []line) error {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text, p.Y.Label.Text = x, y
	if logX {
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	}
	for _, l := range lines {
		lp, pts, err := plotter.NewLinePoints(l.pts)
		if err != nil {
			return err
		}
		lp.Color, pts.Color = l.color, l.color
		if l.dash {
			lp.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		}
		p.Add(lp, pts)
		p.Legend.Add(l.name, lp, pts)
	}
	p.Legend.Top, p.Legend.Left = true, true
	p.Add(plotter.NewGrid())
	return p.Save(18*vg.Centimeter, 11*vg.Centimeter, path)
}

// plot writes one PNG per series that ran: dir/scale-<series>.png.
func (s *Series) plot(dir string) error {
	xy := func(n int, f func(i int) (float64, float64)) plotter.XYs {
		out := make(plotter.XYs, 0, n)
		for i := range n {
			x, y := f(i)
			out = append(out, plotter.XY{X: x, Y: y})
		}
		return out
	}
	if n := len(s.Pods); n > 0 {
		err := chart(filepath.Join(dir, "scale-pods-install.png"), "Install time per pod vs pods on the node (medians since the previous point)",
			"pods on the node", "ms", true, []line{
				{"sluice install, p50", sluiceColor, false, xy(n, func(i int) (float64, float64) { return float64(s.Pods[i].Pods), s.Pods[i].InstallMedianMs })},
				{"sluice install, p90", sluiceColor, true, xy(n, func(i int) (float64, float64) { return float64(s.Pods[i].Pods), s.Pods[i].InstallP90Ms })},
				{"iptables-restore v4+v6 (Istio), p50", iptablesColor, false, xy(n, func(i int) (float64, float64) { return float64(s.Pods[i].Pods), s.Pods[i].IPTablesMedianMs })},
				{"iptables-restore v4+v6 (Istio), p90", iptablesColor, true, xy(n, func(i int) (float64, float64) { return float64(s.Pods[i].Pods), s.Pods[i].IPTablesP90Ms })},
			})
		if err != nil {
			return err
		}
		err = chart(filepath.Join(dir, "scale-pods-memory.png"), "Kernel memory per idle pod vs pods on the node",
			"pods on the node", "KiB per pod", true, []line{
				{"sluice (maps and programs)", sluiceColor, false, xy(n, func(i int) (float64, float64) { return float64(s.Pods[i].Pods), s.Pods[i].IdlePodKiB })},
				{"iptables (kmem charged by the restores)", iptablesColor, false, xy(n, func(i int) (float64, float64) { return float64(s.Pods[i].Pods), s.Pods[i].IPTablesNetnsKiB })},
			})
		if err != nil {
			return err
		}
	}
	if n := len(s.CIDRs); n > 0 {
		err := chart(filepath.Join(dir, "scale-cidrs.png"), "Connection rate through the sidecar vs excluded CIDRs",
			"excluded CIDRs", "connections/s", false, []line{
				{"sluice (-x, tries)", sluiceColor, false, xy(n, func(i int) (float64, float64) { return float64(s.CIDRs[i].CIDRs), s.CIDRs[i].SluiceConnPerS })},
				{"iptables (one RETURN rule per CIDR)", iptablesColor, false, xy(n, func(i int) (float64, float64) { return float64(s.CIDRs[i].CIDRs), s.CIDRs[i].IPTablesConnPerS })},
			})
		if err != nil {
			return err
		}
	}
	if n := len(s.Held); n > 0 {
		err := chart(filepath.Join(dir, "scale-held-memory.png"), "Kernel memory of one pod vs held connections",
			"held connections", "KiB", true, []line{
				{"sluice: maps + socket storage", sluiceColor, false, xy(n, func(i int) (float64, float64) {
					return float64(s.Held[i].Conns), s.Held[i].SluiceMapsKiB + s.Held[i].SluiceSocketKiB
				})},
				{"iptables: conntrack entries", iptablesColor, false, xy(n, func(i int) (float64, float64) { return float64(s.Held[i].Conns), s.Held[i].ConntrackKiB })},
			})
		if err != nil {
			return err
		}
		err = chart(filepath.Join(dir, "scale-held-rate.png"), "Connection rate while connections are held",
			"held connections", "connections/s", true, []line{
				{"sluice", sluiceColor, false, xy(n, func(i int) (float64, float64) { return float64(s.Held[i].Conns), s.Held[i].SluiceConnPerS })},
				{"iptables", iptablesColor, false, xy(n, func(i int) (float64, float64) { return float64(s.Held[i].Conns), s.Held[i].IPTablesConnPerS })},
			})
		if err != nil {
			return err
		}
	}
	if n := len(s.Routes); n > 0 {
		err := chart(filepath.Join(dir, "scale-routes.png"), "Connect latency vs canary routes (sluice; iptables has no routes)",
			"canary routes", "µs", false, []line{
				{"connect, p50", sluiceColor, false, xy(n, func(i int) (float64, float64) { return float64(s.Routes[i].Routes), s.Routes[i].ConnectP50us })},
				{"connect, p90", sluiceColor, true, xy(n, func(i int) (float64, float64) { return float64(s.Routes[i].Routes), s.Routes[i].ConnectP90us })},
				{"first byte from the backend, p50", thirdColor, false, xy(n, func(i int) (float64, float64) { return float64(s.Routes[i].Routes), s.Routes[i].FirstP50us })},
			})
		if err != nil {
			return err
		}
	}
	return nil
}
