"""report: the tables and seaborn figures the book shows, from frames the other packages return. No logic of its
own beyond presentation."""
