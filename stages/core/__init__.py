"""The stage library's core: config building blocks (``config``) and the stage and executor abstractions
(``stage``) every stage module is written against."""
