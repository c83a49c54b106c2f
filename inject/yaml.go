package inject

import "go.yaml.in/yaml/v3"

// Helpers on yaml.v3 trees; a nil node stands for an absent one.

// get is the value of key in mapping m, or nil.
func get(m *yaml.Node, key string) *yaml.Node {
	if m == nil || m.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}
	return nil
}

// items is a sequence's (or mapping's) content; nothing for nil.
func items(n *yaml.Node) []*yaml.Node {
	if n == nil {
		return nil
	}
	return n.Content
}

// scalar is a scalar's value; "" for anything else.
func scalar(n *yaml.Node) string {
	if n == nil || n.Kind != yaml.ScalarNode {
		return ""
	}
	return n.Value
}

// ensure is the value of key in m, added as an empty node of kind when m
// lacks it (or holds null there, as "labels:" with nothing does).
func ensure(m *yaml.Node, key string, kind yaml.Kind, tag string) *yaml.Node {
	if v := get(m, key); v != nil && v.Kind == kind {
		return v
	} else if v != nil && v.Tag == "!!null" {
		*v = yaml.Node{Kind: kind, Tag: tag}
		return v
	}
	v := &yaml.Node{Kind: kind, Tag: tag}
	block(m)
	m.Content = append(m.Content, &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: key}, v)
	return v
}

// block turns a flow mapping ({a: b}) that inject adds to into a block
// one: what it adds would make a long line of it.
func block(m *yaml.Node) { m.Style &^= yaml.FlowStyle }

func ensureMap(m *yaml.Node, key string) *yaml.Node { return ensure(m, key, yaml.MappingNode, "!!map") }
func ensureSeq(m *yaml.Node, key string) *yaml.Node {
	return ensure(m, key, yaml.SequenceNode, "!!seq")
}

// pairs are the key/value nodes of mapping m whose key keep says.
func pairs(m *yaml.Node, keep func(string) bool) [][2]*yaml.Node {
	var out [][2]*yaml.Node
	for i := 0; m != nil && i+1 < len(m.Content); i += 2 {
		if keep(m.Content[i].Value) {
			out = append(out, [2]*yaml.Node{m.Content[i], m.Content[i+1]})
		}
	}
	return out
}

// addAbsent adds each pair whose key m lacks; a key m has keeps its value
// (a pod's own prometheus.io/port, say).
func addAbsent(m *yaml.Node, kvs [][2]*yaml.Node) {
	for _, kv := range kvs {
		if get(m, kv[0].Value) == nil {
			k, v := deepCopy(kv[0]), deepCopy(kv[1])
			// The template's comments on them explain the template, and
			// one on a key in a flow mapping ({a: b}) would split it.
			k.HeadComment, k.LineComment, k.FootComment = "", "", ""
			v.HeadComment, v.LineComment, v.FootComment = "", "", ""
			block(m)
			m.Content = append(m.Content, k, v)
		}
	}
}

// deepCopy copies a tree, so one template part can go into many pods.
func deepCopy(n *yaml.Node) *yaml.Node {
	if n == nil {
		return nil
	}
	c := *n
	c.Content = make([]*yaml.Node, len(n.Content))
	for i, k := range n.Content {
		c.Content[i] = deepCopy(k)
	}
	return &c
}

// str is a plain string scalar.
func str(s string) *yaml.Node { return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: s} }

// deleteKey removes key from mapping m.
func deleteKey(m *yaml.Node, key string) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			m.Content = append(m.Content[:i], m.Content[i+2:]...)
			return
		}
	}
}
