"""``iid segment``: whole rasters in, georeferenced cluster maps out (Ray Data batch inference).

``layout`` decides which windows to read, ``rasters`` reads them and writes the maps, ``run``
joins the stages on a Ray cluster.
"""
