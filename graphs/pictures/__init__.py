"""Pictures of graphs and schedules: matplotlib and pygraphviz are imported here only, when a picture is asked for."""
