"""The data plane: Faust apps for the three workflows, mapping and sinks."""
