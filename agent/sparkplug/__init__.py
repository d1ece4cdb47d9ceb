"""The Sparkplug B 3.0 output profile: the payload codec (protobuf wire format of the
specification's schema, written by hand), the edge node's rules (births, deaths, seq, bdSeq,
rebirth, historical replay) and the MQTT session that publishes the sensors as devices. It may
import the contracts, `agent.config` and `agent.uplink.connection`."""
