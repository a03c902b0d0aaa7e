"""IIIF: the Image API 3.0 request grammar and its region/size arithmetic
(``request``), and the JSON documents the IIIF front serves (``documents``): info.json and
the Presentation 3 manifest. Pure: nothing here reads a file or a request."""
